"""How families generate: sampling and the greedy loop, draft-then-verify decoding with its drafters and draft
trees, and the scoring of generated answers on reasoning data."""
