"""The Krylov basis storage (``hessian_spectra.basis``): flat rows with blocked GEMV dots and
updates, offloaded to files (``basis_dir``) or host memory (``basis_device``) with the same
numbers as in memory, files cleaned up, checkpoints that reference them, and the timing split."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import hessian_spectra as hs
from hessian_spectra import basis as basis_mod
from hessian_spectra.basis import KrylovBasis, Layout, block_dots, block_subtract


class DiagOp:
    """A diagonal operator on several parameters (one larger than a dot block of 2^16 entries,
    so that blocking is exercised), with known eigenvalues ``torch.cat(diags)``."""

    def __init__(self, dtype=torch.float32, sizes=(70_000, 3, 257), seed=0, delay=0.0):
        g = torch.Generator().manual_seed(seed)
        self.params = [torch.zeros(n, dtype=dtype) for n in sizes]
        self.param_names = [f"p{i}" for i in range(len(sizes))]
        self.num_params = sum(sizes)
        self.vector_dtype = dtype
        self.method = "diag"
        self.diags = [torch.rand(n, generator=g, dtype=torch.float64).to(dtype) for n in sizes]
        self.diags[0][:2] = torch.tensor([50.0, 100.0], dtype=dtype)
        self.delay = delay

    def matvec(self, v):
        if self.delay:
            time.sleep(self.delay)
        return [d * x.to(d.dtype) for d, x in zip(self.diags, v)]

    __matmul__ = matvec


def test_block_dots_and_subtract_match_float64():
    """block_dots equals Q @ w in float64 within 2^-16 relative (float32 blocks summed in
    float64), on rows that are column slices of a larger buffer and in bf16; block_subtract
    equals w − Qᵀ c."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(5, 200_000, generator=g)
    Q = big[:, 1000:150_000]  # strided rows
    w = torch.randn(149_000, generator=g)
    ref = Q.double() @ w.double()
    absref = Q.double().abs() @ w.double().abs()
    for Qx in (Q, Q.bfloat16()):
        refx = Qx.double() @ w.double()
        assert torch.all((block_dots(Qx, w) - refx).abs() <= 2.0**-16 * absref)
    assert torch.all((block_dots(Q, w) - ref).abs() <= 2.0**-16 * absref)
    c = torch.randn(5, generator=g, dtype=torch.float64)
    for Qx in (Q, Q.bfloat16()):
        w2 = w.clone()
        block_subtract(Qx, c, w2)
        expect = w.double() - Qx.double().T @ c
        assert float((w2.double() - expect).abs().max()) <= 1e-5


def test_groups_are_runs_of_consecutive_slots():
    """The sweep order: vectors grouped by runs of consecutive slots; a ring (capacity 4) that
    wrapped is swept in slot order."""
    lay = Layout([torch.zeros(3)])
    B = KrylovBasis(lay, torch.float32, capacity=20)
    for t in range(19):
        B.put(t, torch.full((3,), float(t)))
    assert B.groups(range(19)) == [list(range(19))]
    assert B.groups([0, 1, 5, 6, 7]) == [[0, 1], [5, 6, 7]]
    R = KrylovBasis(lay, torch.float32, capacity=4)
    for t in range(6):
        R.put(t, torch.full((3,), float(t)))
    assert sorted(R.kept) == [2, 3, 4, 5]
    assert R.groups([2, 3, 4, 5]) == [[4, 5, 2, 3]]  # slots 0, 1, 2, 3: one run
    assert R.groups([3, 4]) == [[4], [3]]  # slots 0 | 3: two runs
    assert [float(R.vector(t)[0]) for t in (2, 3, 4, 5)] == [2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("chunk_bytes", [None, 1 << 18])
@pytest.mark.parametrize("reorth", ["full", 2, 1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_basis_dir_and_host_give_the_in_memory_numbers(
    tmp_path, monkeypatch, reorth, dtype, chunk_bytes
):
    """alpha and beta with basis_dir (files) and with basis_device='cpu' are bit-identical to
    the in-memory run, for full reorth and windows, in every basis dtype, also with chunks of
    2^16 columns that cut the first parameter and span the others; the files are gone
    afterwards (and so is the directory the run made)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(basis_mod, "CHUNK_BYTES", chunk_bytes)
    work = torch.float64 if dtype == "float64" else torch.float32
    op = DiagOp(work)
    kw = {"reorth": reorth, "basis_dtype": dtype, "seed": 3}
    mem = hs.lanczos(op, 19, **kw)
    d = tmp_path / "basis"
    files = hs.lanczos(op, 19, basis_dir=d, **kw)
    host = hs.lanczos(op, 19, basis_device="cpu", **kw)
    for r in (files, host):
        assert r.alpha.tolist() == mem.alpha.tolist()
        assert r.beta.tolist() == mem.beta.tolist()
    assert not d.exists()
    assert files.config["basis_storage"] == "files" and "basis_storage" not in mem.config


def test_basis_files_are_raw_orthonormal_vectors_one_per_step(tmp_path):
    """During a run, basis_dir holds one raw file per kept vector (the vector's float32 bytes:
    np.fromfile reads them back), and those vectors are orthonormal to 2e-5 ≈ sqrt(P)·ε32 (full
    reorth in float32, P = 70260); an existing directory is kept, emptied of the run's files."""
    op = DiagOp(torch.float32)
    seen = {}

    def look(step, alpha, beta):
        files = sorted(tmp_path.glob("*.bin"))
        seen[step] = [np.fromfile(f, dtype=np.float32) for f in files]

    hs.lanczos(op, 12, basis_dir=tmp_path, callback=look)
    assert [len(v) for v in seen.values()] == list(range(1, 13))
    Q = np.stack(seen[11]).astype(np.float64)  # (12, P)
    assert Q.shape == (12, op.num_params)
    assert np.abs(Q @ Q.T - np.eye(12)).max() <= 2e-5
    assert tmp_path.exists() and not any(tmp_path.iterdir())


def test_basis_file_written_behind_the_caller_and_waited_for(tmp_path, monkeypatch):
    """put() hands the file to the writer thread and returns (the file is not there yet while
    the write is held up); a sweep waits for it and gives the in-memory numbers."""
    import threading

    go = threading.Event()
    write = KrylovBasis._write

    def held(self, *args):
        assert go.wait(10), "the writer was never released"
        write(self, *args)

    monkeypatch.setattr(KrylovBasis, "_write", held)
    lay = Layout([torch.zeros(3), torch.zeros(2)])
    q = torch.tensor([1.0, 2.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    B = KrylovBasis(lay, torch.float64, capacity=2, basis_dir=tmp_path, name="x")
    B.put(0, q)
    assert not B.path(0).exists()  # put did not wait for the write
    go.set()
    w = [torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 1.0]).double()]
    assert B.sweep(B.groups([0]), w).tolist() == [5.0]
    assert B.path(0).stat().st_size == 5 * 8 and B.write_seconds > 0
    B.close()
    assert not any(tmp_path.iterdir())


def test_failed_basis_write_raises_at_the_next_read(tmp_path):
    """A write that fails in the writer thread (here: a directory where its file goes) is raised
    by the next read of the basis, not lost; close() still removes the run's files."""
    lay = Layout([torch.zeros(4)])
    B = KrylovBasis(lay, torch.float32, capacity=3, basis_dir=tmp_path, name="y")
    (tmp_path / "y.q1.rank0.tmp").mkdir()
    B.put(0, torch.ones(4))
    B.put(1, torch.ones(4))
    with pytest.raises(OSError):
        B.sweep(B.groups([0, 1]), [torch.ones(4)])
    (tmp_path / "y.q1.rank0.tmp").rmdir()
    B.close()
    assert not any(tmp_path.iterdir())


def test_basis_files_removed_on_error(tmp_path):
    """A run that fails midway (an exception from the callback) leaves no basis file behind."""
    op = DiagOp(torch.float32)

    def boom(step, alpha, beta):
        if step == 5:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        hs.lanczos(op, 12, basis_dir=tmp_path, callback=boom)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("reorth", ["full", 3])
def test_checkpoint_with_offloaded_basis_resumes_identically(tmp_path, reorth):
    """With basis_dir and a checkpoint, an interrupted run keeps its basis files (the checkpoint
    references them rather than copying them: no kept.* tensors in it), a resumed run gives the
    uninterrupted run's alpha/beta bit for bit, and then every file is gone."""
    op = DiagOp(torch.float32)
    ck, d = tmp_path / "run.ckpt", tmp_path / "basis"
    full = hs.lanczos(op, 12, reorth=reorth, basis_dir=d)

    def stop(step, alpha, beta):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hs.lanczos(op, 12, reorth=reorth, basis_dir=d, checkpoint=ck, callback=stop)
    from safetensors import safe_open

    with safe_open(str(ck), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("kept.")]  # noqa: SIM118
    assert len(list(d.glob("*.bin"))) >= (6 if reorth == "full" else 3)
    again = hs.lanczos(op, 12, reorth=reorth, basis_dir=d, checkpoint=ck)
    assert again.alpha.tolist() == full.alpha.tolist()
    assert again.beta.tolist() == full.beta.tolist()
    assert not ck.exists() and not list(d.glob("*"))


def test_checkpoint_in_memory_cannot_resume_offloaded(tmp_path):
    """A checkpoint written with the basis in memory is refused by a run with basis_dir (the
    settings differ), with an error that says to delete it or keep the setting."""
    op = DiagOp(torch.float32)
    ck = tmp_path / "run.ckpt"

    def stop(step, alpha, beta):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hs.lanczos(op, 10, checkpoint=ck, callback=stop)
    with pytest.raises(ValueError, match="other settings"):
        hs.lanczos(op, 10, checkpoint=ck, basis_dir=tmp_path / "b")


def test_ritz_vectors_from_offloaded_basis(tmp_path):
    """return_basis=True with basis_dir gives the in-memory basis (read back from the files
    before they are removed) and the same Ritz vector."""
    op = DiagOp(torch.float64)
    a = hs.lanczos(op, 10, return_basis=True)
    b = hs.lanczos(op, 10, return_basis=True, basis_dir=tmp_path / "b")
    for qa, qb in zip(a.basis, b.basis):
        assert all(torch.equal(x, y) for x, y in zip(qa, qb))
    ya, yb = a.ritz_vectors([9])[0], b.ritz_vectors([9])[0]
    assert all(torch.equal(x, y) for x, y in zip(ya, yb))


def test_timing_split_accounts_for_the_matvecs():
    """matvec_seconds includes every product's time (an operator that sleeps 20 ms per
    product: ≥ 0.2 s over 10 steps), and matvec + vector + io seconds ≤ seconds."""
    op = DiagOp(torch.float32, delay=0.02)
    r = hs.lanczos(op, 10)
    assert r.matvec_seconds >= 10 * 0.02
    assert r.vector_seconds > 0 and r.io_seconds >= 0
    assert r.matvec_seconds + r.vector_seconds + r.io_seconds <= r.seconds + 1e-9
    d = r.to_dict()
    assert hs.LanczosResult.from_dict(d).matvec_seconds == r.matvec_seconds


def test_basis_dir_that_is_a_file_is_refused(tmp_path):
    """basis_dir naming an existing file is a ValueError that names basis_dir."""
    f = tmp_path / "x"
    f.write_text("")
    with pytest.raises(ValueError, match="basis_dir"):
        hs.lanczos(DiagOp(), 4, basis_dir=f)


def test_slq_and_top_eigenvalues_pass_the_basis_settings(tmp_path):
    """slq and top_eigenvalues with basis_dir (and basis_device) give the in-memory numbers and
    leave no file behind; each run of slq records the files storage in its config."""
    op = DiagOp(torch.float32)
    a = hs.slq(op, 10, 2)
    b = hs.slq(op, 10, 2, basis_dir=tmp_path, basis_device="cpu")
    assert np.array_equal(a.nodes, b.nodes) and np.array_equal(a.weights, b.weights)
    assert all(r.config["basis_storage"] == "files" for r in b.runs)
    e1 = hs.top_eigenvalues(op, 2)
    e2 = hs.top_eigenvalues(op, 2, basis_dir=tmp_path)
    assert e1.eigenvalues.tolist() == e2.eigenvalues.tolist()
    assert not any(tmp_path.iterdir())


def _count_overwrites(monkeypatch):
    """Spy on the writer: per written vector, whether it overwrote an existing file."""
    seen = []
    write = KrylovBasis._write

    def spy(self, t, data, reuse):
        seen.append(any(f.is_file() for f in reuse))
        write(self, t, data, reuse)

    monkeypatch.setattr(KrylovBasis, "_write", spy)
    return seen


def test_slq_probes_overwrite_the_first_probes_files(tmp_path, monkeypatch):
    """Across the probes of one slq run the first probe's files are overwritten in place (the
    later probes write no new file) with the in-memory numbers; a directory slq made is gone
    afterwards, and outside slq a closed basis still removes its files."""
    seen = _count_overwrites(monkeypatch)
    op = DiagOp(torch.float32)
    a = hs.slq(op, 9, 3)
    d = tmp_path / "basis"
    b = hs.slq(op, 9, 3, basis_dir=d)
    assert np.array_equal(a.nodes, b.nodes) and np.array_equal(a.weights, b.weights)
    assert seen == [False] * 9 + [True] * 18
    assert not d.exists()
    seen.clear()
    for _ in range(2):
        hs.lanczos(op, 4, basis_dir=tmp_path)
    assert seen == [False] * 8 and not any(tmp_path.iterdir())


def test_window_overwrites_the_dropped_vectors_file(tmp_path, monkeypatch):
    """With a window of r kept vectors, vector t's file is vector t − r − 1's, overwritten in
    place (the one step late drop keeps the checkpoint's files), with the in-memory numbers."""
    seen = _count_overwrites(monkeypatch)
    op = DiagOp(torch.float64)
    a = hs.lanczos(op, 12, reorth=3)
    b = hs.lanczos(op, 12, reorth=3, basis_dir=tmp_path)
    assert a.alpha.tolist() == b.alpha.tolist() and a.beta.tolist() == b.beta.tolist()
    assert seen == [False] * 4 + [True] * 8
    assert not any(tmp_path.iterdir())


def test_bad_basis_device_is_a_value_error():
    """basis_device that is not a device is a ValueError naming basis_device."""
    with pytest.raises(ValueError, match="basis_device"):
        hs.lanczos(DiagOp(), 4, basis_device="nowhere")


@pytest.mark.parametrize("reorth", ["none", 1, 3, "full"])
def test_bf16_basis_resume_is_bit_identical(tmp_path, reorth):
    """With a bf16 basis (float32 work vectors kept beside it), a run interrupted after step 5
    and resumed from its checkpoint gives the uninterrupted alpha/beta bit for bit."""
    op = DiagOp(torch.float32)
    kw = {"reorth": reorth, "basis_dtype": "bfloat16"}
    full = hs.lanczos(op, 10, **kw)
    ck = tmp_path / "ck"

    def stop(step, alpha, beta):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hs.lanczos(op, 10, checkpoint=ck, callback=stop, **kw)
    again = hs.lanczos(op, 10, checkpoint=ck, **kw)
    assert again.alpha.tolist() == full.alpha.tolist()
    assert again.beta.tolist() == full.beta.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["memory", "files"])
def test_sweep_matches_float64(tmp_path, monkeypatch, dtype, where):
    """One sweep over kept rows in two runs of slots (a ring that wrapped), in chunks of 2^16
    columns that cut and span parameters: the update is w − Qᵀc and the dots and the norm are
    those of the updated w, against float64 references: dots within 2^-16 · Σ|q_i w_i| (rows
    converted exactly, float32 blocks summed in float64), the update within float32 rounding;
    memory and files give the same bits."""
    monkeypatch.setattr(basis_mod, "CHUNK_BYTES", 1 << 18)
    g = torch.Generator().manual_seed(2)
    sizes = (150_000, 7, 70_000)
    lay = Layout([torch.zeros(n) for n in sizes])
    B = KrylovBasis(lay, dtype, capacity=5, basis_dir=tmp_path if where == "files" else None)
    rows = {t: torch.randn(lay.numel, generator=g).to(dtype) for t in range(7)}
    for t, r in rows.items():
        B.put(t, r)  # slots 2, 3, 4, 0, 1 for t = 2..6: 3, 4 | 5, 6 are two runs
    groups = B.groups([3, 4, 5, 6])
    assert groups == [[5, 6], [3, 4]]
    order = [t for grp in groups for t in grp]
    Q = torch.stack([rows[t] for t in order]).double()
    w0 = torch.randn(lay.numel, generator=g)
    c = torch.randn(4, generator=g, dtype=torch.float64) * 1e-3
    w = [x.clone() for x in lay.views(w0.clone())]
    out = B.sweep(groups, w, subtract=c, norm=True)
    w1 = torch.cat([x.reshape(-1) for x in w]).double()
    expect = w0.double() - Q.T @ c.to(torch.float32).double()
    assert float((w1 - expect).abs().max()) <= 1e-6 * float(expect.abs().max())
    ref = Q @ w1
    assert torch.all((out[:4] - ref).abs() <= 2.0**-16 * (Q.abs() @ w1.abs()))
    assert abs(float(out[4]) - float(w1 @ w1)) <= 2.0**-16 * float(w1 @ w1)
    again = KrylovBasis(lay, dtype, capacity=5)
    for t, r in rows.items():
        again.put(t, r)
    w2 = [x.clone() for x in lay.views(w0.clone())]
    assert torch.equal(again.sweep(groups, w2, subtract=c, norm=True), out)
    assert all(torch.equal(a, b) for a, b in zip(w, w2))
    B.close()


def test_streamed_basis_holds_two_chunks():
    """A file-backed basis of 12 vectors of 1M entries holds two chunks of its rows in memory
    (the one worked on and the next, CHUNK_BYTES of float32 each), not whole vectors."""
    import tempfile

    lay = Layout([torch.zeros(1_000_000)])
    with tempfile.TemporaryDirectory() as d:
        B = KrylovBasis(lay, torch.float32, capacity=12, basis_dir=d)
        for t in range(12):
            B.put(t, torch.randn(lay.numel))
        w = [torch.randn(lay.numel)]
        B.sweep(B.groups(range(12)), w, subtract=torch.zeros(12, dtype=torch.float64))
        held = sum(x.numel() * 4 for x in B._bufs if x is not None)
        held += sum(x.numel() * x.element_size() for x in B._scratch.values())
        assert held <= 2 * basis_mod.CHUNK_BYTES < 12 * lay.numel * 4 / 2
        B.close()
