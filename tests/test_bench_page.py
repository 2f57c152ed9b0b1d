"""lab/bench_page.py keeps a benchmark log's tables and where it ran, and refuses logs that are no figures."""
import pytest

from lab import bench_page

LOG = """serial: start 2026-12-07T01:13:47Z, load 1.03 1.97 1.69: python -m benchmarks.speculative --batch 1
a warning line the page leaves out
## greedy decoding, 2 prompts
| decoding | speedup |
|---|---|
| plain greedy | 1 |
| heads, chain | 1.657 |
serial: done in 96s, exit 0, load 1.21 1.70 1.62
"""


def test_page_keeps_the_tables_command_and_load(tmp_path):
    log = tmp_path / "bench.log"
    log.write_text(LOG)
    out = tmp_path / "page.md"
    bench_page.main([str(log), "--title", "Speed", "--out", str(out), "--machine", "test CPU"])
    page = out.read_text()
    assert "`python -m benchmarks.speculative --batch 1`" in page
    assert "load 1.03 at the start and 1.21 at the end" in page and "96 s" in page
    assert "| heads, chain | 1.657 |" in page and "### greedy decoding, 2 prompts" in page
    assert "warning" not in page and "Machine: test CPU." in page


@pytest.mark.parametrize("log, message", [(LOG.replace("exit 0", "exit 1"), "exited with 1"),
                                          ("| a | b |\n", "no `serial: start`")], ids=["failed", "unlogged"])
def test_page_refuses_failed_or_unlogged_runs(tmp_path, log, message):
    path = tmp_path / "bench.log"
    path.write_text(log)
    with pytest.raises(SystemExit, match=message):
        bench_page.main([str(path), "--title", "Speed", "--out", str(tmp_path / "page.md")])
    assert not (tmp_path / "page.md").exists()
