"""experiments/benchmark_gpu.py: the --device cpu --quick run (so the GPU benchmark cannot rot) and its OOM cells."""
import pytest
import torch

from experiments.benchmark_gpu import COLUMNS, Cell, Row, format_cells, main, measure, ratio

pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED_ROWS = (
    [(f"generator {mode}", setting, "2", impl) for setting in ("tiny 32 px", "tiny 64 px")
     for mode in ("forward", "forward+backward") for impl in ("ref", "fast")]
    + [("DHR refinement", "64 px, 2 weight + 2 feature steps", str(b), p) for b in (1, 8)
       for p in ("fp32", "bf16 autocast")]
    + [("stage-2 inference", "64 px, e4e 64 px + levels [8, 16]", "8", p) for p in ("fp32", "bf16 autocast")])


def table_rows(text: str):
    """The Markdown table of ``text`` as lists of cells (header first, separator dropped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_quick_cpu_run_prints_the_full_table(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    rows = main(["--device", "cpu", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    table = table_rows(printed)
    assert table[0] == list(COLUMNS)
    body = table[1:]
    assert [tuple(r[:4]) for r in body] == EXPECTED_ROWS
    assert all(len(r) == len(COLUMNS) for r in body)
    assert all(float(r[4]) > 0 for r in body), "every cell measured (no OOM / failure on CPU)"
    assert all(r[7] == "n/a" for r in body), "no GPU peak memory on CPU"
    assert all(r[6] == "–" for r in body), "--quick sizes are not compared with the official DHR"
    by_key = {tuple(r[:4]): r for r in body}
    for key, r in by_key.items():
        if key[3] == "ref" or (key[3] == "fp32" and (key[0] != "DHR refinement" or key[2] == "1")):
            assert r[5] == "1.00x (baseline)"
        else:
            assert r[5].endswith(("vs ref", "vs fp32", "vs fp32 batch 1")) and float(r[5].split("x")[0]) > 0
        if key[3] == "bf16 autocast":
            assert r[8].startswith("PSNR vs fp32 ") and r[8].endswith(" dB")
    # bf16 stays close to fp32 (the "same quality" check is a real number)
    assert all(r.extra["psnr"] > 25 for r in rows if r.variant == "bf16 autocast")
    assert out.read_text().strip() == printed.strip()
    assert "0.083 images/s" in printed and "10x" in printed


def test_out_of_memory_is_a_table_cell_not_a_crash():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cell = measure(oom, "cpu")
    assert cell.seconds is None and cell.failure == "OOM"
    row = Row("DHR refinement", "1024 px", 8, "fp32", cell)
    ok = Row("DHR refinement", "1024 px", 1, "fp32", Cell(2.0))
    assert format_cells(row)[4] == format_cells(row)[7] == "OOM"
    assert ratio(row, ok, "vs fp32 batch 1") == "–" and ratio(ok, ok, "x") == "1.00x x"
