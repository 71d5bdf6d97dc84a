"""benchmarks/bench_3b.py runs end to end on tiny configs of both models (the full run, at the 3B shapes, is done by
hand)."""

import re

from conftest import REPO, run_python

ROWS = ["load, s", "peak memory, GiB", "vision tower + projector, s", "prefill, 256 image + 10 text tokens",
        "decode, median ms per token", "decode / bandwidth floor"]


def test_the_benchmark_runs_on_tiny_configs_of_paligemma_and_paligemma_2(tmp_path):
    out = tmp_path / "results.md"
    result = run_python("benchmarks/bench_3b.py", "--tiny", "--weights", str(tmp_path), "--repeats", "2",
                        "--tokens", "4", "--out", str(out), cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    cpu = re.search(r"^CPU: (.+)$", result.stdout, re.M)
    assert cpu and result.stdout.startswith("CPU: ")  # the CPU model comes first, and again in the file
    report = out.read_text()
    assert f"CPU: {cpu[1]} " in report
    sections = report.split("\n## ")[1:]
    assert [s.split("\n")[0] for s in sections] == ["PaliGemma 1, paligemma-3b-pt-224 configuration",
                                                    "PaliGemma 2, paligemma2-3b-pt-224 configuration"]
    number = r"([\d.]+)"
    for section in sections:
        for row in ROWS:
            assert f"| {row}" in section, row
        times = re.findall(r"\| decode, median ms per token \| " + r" \| ".join([number] * 5) + r" \|", section)
        assert times and all(float(t) > 0 for t in times[0])  # the times and both ratios
        assert "next-token agreement" in section and "re-encoding the image at every step" in section
    assert "transformers text model sdpa" in sections[0]
    assert "transformers text model eager" in sections[1]  # Gemma 2's reference: soft-capped eager attention
    for folder in ["random-tiny", "random-tiny-paligemma2"]:  # written once, reused by later runs
        assert (tmp_path / folder / "model.safetensors").is_file()


def test_a_run_of_one_model_keeps_the_other_models_table_only_from_the_same_cpu(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_3b

    header = "# nanopali vs transformers\n\nCPU: Some CPU (each table's notes give the whole machine)\n\n"
    one, two = (f"## {spec.title}\n\n| table {i} |\n\n- notes {i}\n" for i, spec in enumerate(bench_3b.MODELS.values()))
    results = tmp_path / "results.md"
    results.write_text(header + one + "\n" + two)
    assert bench_3b.earlier_sections(results, header) == dict(zip(bench_3b.MODELS, [one, two]))
    assert bench_3b.earlier_sections(results, header.replace("Some CPU", "Another CPU")) == {}
    assert bench_3b.earlier_sections(tmp_path / "absent.md", header) == {}
