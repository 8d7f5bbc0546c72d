"""bnlib.perf: traffic counts against hand counts, saved tensors against what
torch documents, Welford/Chan against float64 NumPy."""

import numpy as np
import pytest
import torch

import bnlib.functional as bnF
from bnlib import perf


def test_tensor_bytes_counts_broadcast_axes_once():
    x = torch.zeros(4, 3, 5, 5)
    assert perf.tensor_bytes(x) == 4 * 3 * 25 * 4
    v = torch.zeros(3).view(1, 3, 1, 1).expand(4, 3, 5, 5)
    assert perf.tensor_bytes(v) == 3 * 4


def test_op_traffic_hand_counts():
    # Exact integers: each elementwise op streams its inputs once and writes its output.
    x = torch.randn(8, 16)
    xb = x.numel() * 4
    _, ops = perf.op_traffic(lambda: (x - x.mean(0)) * 2.0)
    assert [(o["op"].split(".")[0], o["read"], o["written"]) for o in ops] == [
        ("mean", xb, 16 * 4), ("sub", xb + 16 * 4, xb), ("mul", xb, xb)]
    _, ops = perf.op_traffic(lambda: x * x)  # the same tensor twice is one read
    assert ops[0]["read"] == xb
    out = torch.empty_like(x)
    _, ops = perf.op_traffic(lambda: torch.mul(x, 3.0, out=out))  # out= is written, not read
    assert (ops[0]["read"], ops[0]["written"]) == (xb, xb)
    _, ops = perf.op_traffic(lambda: x.view(16, 8))  # views move nothing
    assert ops == []
    _, ops = perf.op_traffic(lambda: (torch.empty_like(x), torch.zeros_like(x)))  # allocation, a fill
    assert [(o["read"], o["written"]) for o in ops] == [(0, 0), (0, xb)]


def test_traffic_table_totals():
    ops = [{"op": "a", "read": 1000, "written": 0}, {"op": "b", "read": 4, "written": 4},
           {"op": "c", "read": 1000, "written": 1000}, {"op": "d", "read": 6, "written": 0}]
    rows = perf.traffic_table(ops, 1000)  # b and d move < 1% of |x|: one summary row
    assert rows == [("a", 1.0, 0.0), ("c", 1.0, 1.0), ("2 per-channel ops", 0.01, 0.0), ("total", 2.01, 1.0)]


def test_saved_tensors_of_exp_is_its_output():
    # torch's exp saves its result for the backward (d exp(x) = exp(x) dx).
    x = torch.randn(10, requires_grad=True)
    y, saved = perf.saved_tensors(torch.exp, x)
    assert saved == [{"shape": (10,), "dtype": torch.float32, "bytes": 40, "is_arg": False}]
    _, saved = perf.saved_tensors(torch.sin, x)  # sin saves its input
    assert saved == [{"shape": (10,), "dtype": torch.float32, "bytes": 40, "is_arg": True}]


def test_peak_bytes_counts_live_tensors():
    x = torch.randn(1000)

    def f():
        a = x * 2  # 4000 bytes live
        b = a + 1  # 8000 bytes live
        del a
        c = b * 3  # a freed: 8000 again
        return c.sum()

    assert perf.peak_bytes(f, x) == 8000 + 4  # b and c live, then the 4-byte sum
    assert perf.peak_bytes(lambda: x.mul_(1.0), x) == 0  # in place: no allocation


def test_time_interleaved_returns_positive_medians():
    t = perf.time_interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, rounds=3, min_time=1e-4)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())


def test_bench_cpu_rows():
    import torch.nn.functional as F
    rows = perf.bench_cpu([(8, 4)], {"native": F.batch_norm}, rounds=1, min_time=1e-4)
    assert {r["pass"] for r in rows} == {"fwd", "fwdbwd", "eval"}
    assert all(r["ratio"] == 1.0 and r["pct_copy"] > 0 for r in rows)


@pytest.mark.parametrize("lanes", [1, 7, 256])
def test_welford_matches_float64(lanes):
    # float32 data, mean 1e4, std 1: Welford + Chan stays within 1e-3 (the contract's bound)
    # of the float64 variance; E[x^2] - E[x]^2 in float32 does not.
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((3001, 3))).astype(np.float32)
    n, mean, m2 = perf.welford(x, lanes=lanes)
    truth = x.astype(np.float64).var(axis=0)
    assert np.all(n == 3001)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(m2 / n, truth, rtol=1e-3)
    assert np.max(np.abs(perf.naive_var(x) / truth - 1)) > 1e-2


def test_chan_merge_of_parts_is_the_whole():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50)
    a, b = x[:20], x[20:]
    n, mean, m2 = perf.chan_merge((20.0, a.mean(), 20 * a.var()), (30.0, b.mean(), 30 * b.var()))
    assert n == 50
    np.testing.assert_allclose([mean, m2], [x.mean(), 50 * x.var()], rtol=1e-12)  # float64 rounding only


def test_welford_bad_input():
    with pytest.raises(ValueError, match="shape \\(m, C\\)"):
        perf.welford(np.zeros(5))


@pytest.mark.parametrize("block", [1, 5, 64, 10_000])
def test_shifted_stats_matches_float64_and_the_kernels(block):
    # The C++ kernels' one-pass statistics, in NumPy: float32, mean 1e4, std 1,
    # within the contract's 1e-3 of float64, and the same as the kernels compute.
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((3001, 3))).astype(np.float32)
    n, mean, m2 = perf.shifted_stats(x, block=block)
    truth = x.astype(np.float64).var(axis=0)
    assert n == 3001
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(m2 / n, truth, rtol=1e-4)
    from bnlib import cpu_kernels
    if cpu_kernels.is_available():
        _, _, var = bnF.batch_norm_train(torch.from_numpy(x), None, None, 1e-5)
        np.testing.assert_allclose(var.numpy(), m2 / n, rtol=1e-5)


def test_shifted_stats_bad_input():
    with pytest.raises(ValueError, match="shape \\(m, C\\)"):
        perf.shifted_stats(np.zeros(5))
    with pytest.raises(ValueError, match="block must be >= 1"):
        perf.shifted_stats(np.zeros((4, 2)), block=0)


@pytest.mark.parametrize("name", ["kernels", "tensor_ops"])
def test_cpu_path_pins_the_path(name):
    from bnlib import cpu_kernels
    if name == "kernels" and not cpu_kernels.is_available():
        pytest.skip("bnlib's CPU kernels could not be built here")
    fn = perf.cpu_path(name)
    x = torch.randn(16, 3, requires_grad=True)
    y, ops = perf.op_traffic(fn, x, torch.zeros(3), torch.ones(3), None, None, True)
    names = [op for op, *_ in perf.traffic_table(ops, x.numel() * 4)]
    if name == "kernels":
        assert names[0] == "batch_norm_forward.default"
    else:
        assert "batch_norm_forward.default" not in names
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'kernels' or 'tensor_ops'"):
        perf.cpu_path("fast")


def test_chan_merge_integer_means_and_empty_sides():
    """Integer means are merged in float64 (the weight 1/2 was cast to int,
    0); an empty side's mean, NaN as np.mean of nothing, is not used."""
    n, mean, m2 = perf.chan_merge((2, 1, 0.5), (2, 2, 0.5))
    assert (n, float(mean), float(m2)) == (4, 1.5, 2.0)
    empty_mean = float("nan")  # what np.mean of nothing gives
    for a, b in (((0, empty_mean, 0.0), (3, 2.0, 1.5)), ((3, 2.0, 1.5), (0, empty_mean, 0.0))):
        n, mean, m2 = perf.chan_merge(a, b)
        assert (n, float(mean), float(m2)) == (3, 2.0, 1.5)


def test_welford_keeps_half_inputs_statistics_in_float32():
    """float16 counts stop at 2048 and overflow past 65504: the statistics of
    a float16 input are kept in float32, as the kernels keep them."""
    x = np.random.default_rng(0).standard_normal((70000, 1)).astype(np.float16)
    n, mean, m2 = perf.welford(x)
    exact = x.astype(np.float64)
    assert n.dtype == np.float32 and n[0] == 70000
    assert abs(mean[0] - exact.mean()) < 1e-5
    assert abs(m2[0] / ((exact - exact.mean()) ** 2).sum() - 1) < 1e-4


def test_tensor_bytes_of_overlapping_views_and_table_totals():
    base = torch.randn(1000, 10)
    assert perf.tensor_bytes(base.unfold(0, 3, 1)) == base.nbytes  # windows overlap
    assert perf.tensor_bytes(torch.randn(2, 3).expand(4, 2, 3)) == 24
    assert perf.tensor_bytes(torch.randn(3, 4).t()) == 48
    # the total is the bytes summed, then rounded (three rows of 0.33 are 1.0)
    rows = perf.traffic_table([{"op": "a", "read": 1, "written": 1}] * 3, 3)
    assert rows[-1] == ("total", 1.0, 1.0)


def test_bench_results_found_from_a_chapter_folder_without_editable_install(tmp_path, monkeypatch):
    """A chapter reads the committed results next to an editable install of
    bnlib, or, installed elsewhere, from its own folder's parents."""
    import json

    committed = perf.bench_results("gpu_h100.json")
    assert "meta" in committed and committed["meta"]["device"]
    checkout = tmp_path / "book"
    (checkout / "bench" / "results").mkdir(parents=True)
    (checkout / "chapters").mkdir()
    (checkout / "bench" / "results" / "x.json").write_text(json.dumps({"rows": [1]}))
    # bnlib installed somewhere without bench/ beside it (pip install .)
    monkeypatch.setattr(perf, "__file__", str(tmp_path / "site" / "bnlib" / "perf.py"))
    assert perf.bench_results("x.json", start=checkout / "chapters") == {"rows": [1]}
    monkeypatch.chdir(checkout / "chapters")
    assert perf.bench_results("x.json") == {"rows": [1]}
    with pytest.raises(FileNotFoundError, match="bench/results/missing.json"):
        perf.bench_results("missing.json")
    for bad in ("gpu_h100", "../x.json", 3):
        with pytest.raises(ValueError, match="bench_results expects a file name"):
            perf.bench_results(bad)


_FAULTS_SCRIPT = """
import ctypes, resource, sys
from bnlib import perf
pinned = perf.pin_glibc_malloc() if sys.argv[1] == "pin" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 64 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def use_once():
    block = libc.malloc(size)
    libc.memset(block, 1, size)  # every page written
    libc.free(block)
use_once()  # the heap grows once
before = faults()
for _ in range(10):
    use_once()
print(pinned, faults() - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_pin_glibc_malloc_reuses_freed_blocks():
    """64 MiB is above the largest mmap threshold glibc sets itself (32 MiB):
    by default every such block is a fresh mmap, whose 16384 pages (4 KiB)
    fault in when written; pinned, the freed block is reused. Each case in a
    process of its own: the pin lasts for the process."""
    import subprocess
    import sys

    result = {}
    for mode in ("default", "pin"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        result[mode] = (out[0], int(out[1]))
    pages = (64 << 20) // 4096
    assert result["default"][1] > 10 * pages * 0.9  # the control: fresh pages every time
    assert result["pin"][0] == "True" and result["pin"][1] < pages / 10  # reused


def test_pin_glibc_malloc_changes_nothing_without_glibc(monkeypatch):
    import ctypes
    import platform

    def refuse(*args, **kwargs):
        raise AssertionError("the C library must not be touched")

    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert perf.pin_glibc_malloc() is False


def test_shifted_stats_float32_summary_grows_with_the_mean():
    """The shift alone does not keep the shifted sums flat: with the merged
    summary in float32 its mean, near the data's, is rounded at every merge
    (the chapter's control). Float32 data, std 1, mean 1e5: in float64 the
    variance is within 1e-6 of the exact one (the float32 sums' rounding
    only); in float32 at least 30 times further off, at 1e1 it is not."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((20_000, 8))
    err = {}
    for mean in (1e1, 1e5):
        x = (mean + base).astype(np.float32)
        truth = x.astype(np.float64).var(axis=0)
        for dtype in (np.float64, np.float32):
            n, mu, m2 = perf.shifted_stats(x, summary_dtype=dtype)
            assert mu.dtype == dtype and m2.dtype == dtype
            err[(mean, np.dtype(dtype).name)] = np.median(np.abs(m2 / n / truth - 1))
    assert err[(1e5, "float64")] < 1e-6 and err[(1e1, "float64")] < 1e-6
    assert err[(1e5, "float32")] > 30 * max(err[(1e5, "float64")], err[(1e1, "float32")])
    with pytest.raises(ValueError, match="summary_dtype must be float32 or float64"):
        perf.shifted_stats(np.zeros((4, 2), np.float32), summary_dtype=np.float16)
