"""benchmarks/bench_3b.py runs end to end on a tiny config (the full run, at the 3B shapes, is done by hand)."""

import re

from conftest import REPO, run_python


def test_the_benchmark_runs_on_a_tiny_config(tmp_path):
    out = tmp_path / "results.md"
    result = run_python("benchmarks/bench_3b.py", "--tiny", "--checkpoint", str(tmp_path / "tiny"), "--repeats",
                        "2", "--tokens", "4", "--out", str(out), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    for row in ["load, s", "peak memory, GiB", "vision tower + projector, s", "prefill, 256 image + 10 text tokens",
                "decode, median ms per token", "decode / bandwidth floor"]:
        assert f"| {row}" in report, row
    number = r"([\d.]+)"
    cells = [number] * 5
    ratios = re.findall(r"\| decode, median ms per token \| " + r" \| ".join(cells) + r" \|", report)
    assert ratios and all(float(r) > 0 for r in ratios[0])  # the times and both ratios
    assert "next-token agreement" in report and "re-encoding the image at every step" in report
    assert (tmp_path / "tiny" / "model.safetensors").is_file()  # written once, reused by later runs
