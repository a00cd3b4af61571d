"""Lanczos checkpoints (``hessian_spectra.lanczos_state``): safetensors + JSON, never unpickled,
validated on load, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

import hessian_spectra as hs
from conftest import known_spectrum_matrix

EIGS = np.concatenate([[100.0, 50.0], np.linspace(0.0, 1.0, 58)])


class _TouchOnUnpickle:
    """An object whose unpickling creates the file ``marker`` (a harmless stand-in for the
    ``os.system`` payload of issue 13 item 10)."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _interrupted(H, ck, at=3, **kw):
    """Run 10 Lanczos steps on H with checkpoint ``ck`` and stop (KeyboardInterrupt) at ``at``."""

    def stop(step, alpha, beta):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hs.lanczos(H, 10, checkpoint=ck, callback=stop, **kw)


def test_pickle_in_place_of_checkpoint_is_not_run(tmp_path):
    """A pickle (torch.save) file where the checkpoint is expected is never unpickled: its payload,
    which does create its marker file when unpickled, leaves no marker, and lanczos raises a
    ValueError that names the file and says to delete it."""
    control = tmp_path / "control"
    torch.save(_TouchOnUnpickle(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()  # the payload is live: unpickling the file runs it

    marker = tmp_path / "marker"
    ck = tmp_path / "lanczos.pt"
    torch.save(_TouchOnUnpickle(marker), ck)
    with pytest.raises(ValueError, match="not a Lanczos checkpoint") as e:
        hs.lanczos(known_spectrum_matrix(EIGS), 10, checkpoint=ck)
    assert not marker.exists()
    assert str(ck) in str(e.value) and "delete" in str(e.value)


def test_checkpoint_is_safetensors_with_json_state(tmp_path):
    """The checkpoint is a safetensors file: plain tensors (q, the kept basis) and the scalars and
    settings as JSON in its metadata; alpha/beta in it are those of the first steps."""
    H = known_spectrum_matrix(EIGS)
    ck = tmp_path / "ck"
    _interrupted(H, ck, at=3)
    with safe_open(str(ck), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    state = json.loads(meta["state"])
    assert meta["format"] == "hessian_spectra.lanczos_checkpoint"
    ref = hs.lanczos(H, 10)
    assert state["alpha"] == ref.alpha[:3].tolist() and state["beta"] == ref.beta[:3].tolist()
    assert {"q.0"} | {f"kept.{k}.0" for k in range(3)} == keys  # q_prev is kept[-1]


@pytest.mark.parametrize("reorth", ["full", 2, "none"])
def test_resume_on_dense_matrix_is_bit_identical(tmp_path, reorth):
    """Interrupted at step 3 and resumed: alpha, beta, breakdown and v0_norm equal the
    uninterrupted run's bit for bit, and the file is removed at the end."""
    H = known_spectrum_matrix(EIGS)
    ref = hs.lanczos(H, 10, reorth=reorth, seed=5, basis_dtype=torch.float32)
    ck = tmp_path / "ck.safetensors"
    _interrupted(H, ck, reorth=reorth, seed=5, basis_dtype=torch.float32)
    res = hs.lanczos(H, 10, reorth=reorth, seed=5, basis_dtype=torch.float32, checkpoint=ck)
    np.testing.assert_array_equal(res.alpha, ref.alpha)
    np.testing.assert_array_equal(res.beta, ref.beta)
    assert res.v0_norm == ref.v0_norm and res.breakdown == ref.breakdown
    assert not ck.exists()


def _rewrite(ck, *, tensors=None, state=None):
    """Rewrite checkpoint ``ck`` with changed tensors and/or JSON state (a crafted file)."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(ck), framework="pt") as f:
        meta = dict(f.metadata())
    t = load_file(str(ck))
    t.update(tensors or {})
    st = json.loads(meta["state"])
    st.update(state or {})
    meta["state"] = json.dumps(st)
    save_file(t, str(ck), metadata=meta)


@pytest.mark.parametrize(
    "tensors, state, match",
    [
        ({"q.0": torch.zeros(59, dtype=torch.float64)}, None, r"q\.0 of shape \(59,\)"),
        ({"q.0": torch.zeros(60, dtype=torch.float32)}, None, r"q\.0 in dtype float32"),
        (None, {"beta": [1.0]}, "3 alpha and 1 beta"),
        (None, {"alpha": [1.0, 2.0], "beta": [1.0, 2.0]}, "kept basis has 3 vectors"),
        (None, {"scale": "big"}, "scale"),
    ],
)
def test_tampered_checkpoint_is_refused(tmp_path, tensors, state, match):
    """A checkpoint whose tensors or JSON do not fit the run (shape, dtype, step count, kept basis,
    a scalar's type) raises a ValueError naming the file and the fault, instead of resuming."""
    H = known_spectrum_matrix(EIGS)
    ck = tmp_path / "ck"
    _interrupted(H, ck, at=3)
    _rewrite(ck, tensors=tensors, state=state)
    with pytest.raises(ValueError, match=match) as e:
        hs.lanczos(H, 10, checkpoint=ck)
    assert str(ck) in str(e.value)


def test_truncated_checkpoint_is_refused(tmp_path):
    """A checkpoint cut short (half its bytes) is refused with a ValueError naming the file."""
    H = known_spectrum_matrix(EIGS)
    ck = tmp_path / "ck"
    _interrupted(H, ck, at=3)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a Lanczos checkpoint"):
        hs.lanczos(H, 10, checkpoint=ck)


class _Counting:
    """The dense H, counting its products and raising KeyboardInterrupt at product ``stop_at``."""

    def __init__(self, H, stop_at=None):
        self.inner = hs.as_operator(H)
        self.params, self.param_names = self.inner.params, self.inner.param_names
        self.num_params, self.vector_dtype = self.inner.num_params, self.inner.vector_dtype
        self.method, self.calls, self.stop_at = "dense", 0, stop_at

    def matvec(self, v):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner.matvec(v)

    __matmul__ = matvec


def test_slq_checkpoint_dir_uses_safetensors(tmp_path):
    """slq(checkpoint_dir=...) keeps mid-probe state in probe{s}.safetensors; interrupted in probe 1
    after 4 of its 8 steps, the resumed run does only the 4 missing products and its nodes equal
    an uninterrupted run's; the file is removed at the end."""
    H = known_spectrum_matrix(EIGS)
    ref = hs.slq(H, 8, 2, seed=1)
    with pytest.raises(KeyboardInterrupt):  # probe 0: products 1-8, probe 1: 9-12 done, 13 stops
        hs.slq(_Counting(H, stop_at=13), 8, 2, seed=1, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe1.safetensors"]
    op = _Counting(H)
    res = hs.slq(op, 8, 2, seed=1, checkpoint_dir=tmp_path, runs=ref.runs[:1])
    assert op.calls == 4
    np.testing.assert_array_equal(res.nodes, ref.nodes)
    assert list(tmp_path.iterdir()) == []


class _FlatViews:
    """H on two parameters (shapes (40,) and (4, 5)) whose products are views of one flat
    tensor, as an operator built on a flat gradient buffer returns them."""

    def __init__(self, H):
        self.H, self.method = H, "flat"
        self.params = [torch.zeros(40, dtype=H.dtype), torch.zeros(4, 5, dtype=H.dtype)]
        self.param_names, self.num_params, self.vector_dtype = ["a", "b"], 60, H.dtype

    def matvec(self, v):
        y = self.H @ torch.cat([t.reshape(-1) for t in v])
        return [y[:40], y[40:].view(4, 5)]

    __matmul__ = matvec


def test_checkpoint_of_vectors_sharing_one_buffer(tmp_path):
    """Lanczos vectors whose tensors are views of one buffer (safetensors refuses shared memory)
    are checkpointed, and the resumed run equals the uninterrupted one bit for bit."""
    op = _FlatViews(known_spectrum_matrix(EIGS))
    ref = hs.lanczos(op, 10, reorth="none")
    ck = tmp_path / "ck"
    _interrupted(op, ck, at=5, reorth="none")
    res = hs.lanczos(op, 10, reorth="none", checkpoint=ck)
    np.testing.assert_array_equal(res.alpha, ref.alpha)
    np.testing.assert_array_equal(res.beta, ref.beta)
