"""The Zarr run store against real stores on disk: round trip, crash safety under SIGKILL, corruption, retention."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from enkg_dist.store import layout
from enkg_dist.store.runstore import mean_std
from enkg_dist.store import RunStore, StoreError, StoreIntegrityError, WriterError, open_xarray

J, SHAPE, M, K = 6, (4, 5), 3, 2
CONFIG = {"name": "t", "seed": 0, "enkg": {"scale": 2.0, "num_steps": 8}, "execution": {"num_workers": 2}}


def particles_for(t, J=J, shape=SHAPE):
    """The ensemble after step t, recomputable from t alone."""
    return np.sin(np.arange(J * int(np.prod(shape)), dtype=np.float64).reshape(J, *shape) + 0.1 * t) * (t + 1)


def psi_for(t, k, j, m=M):
    return np.arange(m, dtype=np.float64) + 100 * t + 10 * k + j


def make(path, num_steps=8, full_every=1, **kw):
    return RunStore.create(path, config=CONFIG, config_yaml="name: t\n", J=J, state_shape=SHAPE, obs_size=M,
                           num_steps=num_steps, num_corrections=K, full_every=full_every, **kw)


def record(store, t, k, j, psi, ok, reason=None):
    """One member's record (the store records in groups; one member is a group of one)."""
    store.record_members(t, k, [j], np.asarray(psi)[None], [ok], [reason])


def run_steps(store, steps):
    """Record every member of every correction (member 1 fails at k=1), then commit the step."""
    for t in steps:
        for k in range(K):
            for j in range(J):
                ok = not (k == 1 and j == 1)
                record(store, t, k, j, psi_for(t, k, j), ok, None if ok else f"diverged at step {t}")
        store.commit_step(t, particles_for(t), {"sigma": 1.0 / (t + 1), "misfit": [t, t + 0.5],
                                                 "weight": [0.1, 0.2], "timings": {"total": 2.0, "forward": 1.5}})


def chunk_file(path, array, step, ndim):
    return Path(path, *array.split("/"), "c", str(step), *["0"] * (ndim - 1))


def test_round_trip(tmp_path):
    path = tmp_path / "run.zarr"
    with make(path) as store:
        run_steps(store, range(4))
    r = RunStore.open(path)
    assert r.committed_step == 3 and r.config == CONFIG and r.attrs["config_yaml"] == "name: t\n"
    assert set(r.attrs["versions"]) == {"python", "torch", "numpy", "zarr", "enkg_dist"}
    for t in range(4):
        x = particles_for(t)
        np.testing.assert_array_equal(r.read("particles", t), x)
        np.testing.assert_allclose(r.read("mean", t), x.mean(0))
        np.testing.assert_allclose(r.read("std", t), x.std(0, ddof=1))
        np.testing.assert_array_equal(r.read("psi", t)[1, 4], psi_for(t, 1, 4))
    status = r.read("status")
    assert status.shape == (4, K, J) and (status[:, 1, 1] == 2).all() and (status == 2).sum() == 4
    assert r.read("reason", 2)[1, 1] == "diverged at step 2"
    np.testing.assert_array_equal(r.read("misfit")[:, 1], [0.5, 1.5, 2.5, 3.5])
    timings = r.read("timings")
    assert timings[0, r.timing_fields.index("forward")] == 1.5 and np.isnan(timings[0, r.timing_fields.index("update")])
    assert r.array("psi").metadata.dimension_names == ("step", "correction", "member", "obs")
    assert r.array("particles").metadata.dimension_names == ("step", "member", "y", "x")
    step, x = r.resume_state()
    assert step == 3 and np.array_equal(x, particles_for(3))
    ds = open_xarray(path)
    assert ds.sizes["step"] == 4 and ds.psi.dims == ("step", "correction", "member", "obs")
    assert ds.particles.chunks is not None  # dask-backed
    np.testing.assert_allclose(ds["mean"].sel(step=2).values, particles_for(2).mean(0))
    assert list(ds.timing.values) == r.timing_fields


def test_refuses_to_overwrite_and_checks_steps(tmp_path):
    path = tmp_path / "run.zarr"
    store = make(path)
    with pytest.raises(StoreError, match="already exists"):
        make(path)
    with pytest.raises(ValueError, match="next step to commit is 0"):
        store.commit_step(1, particles_for(1))
    with pytest.raises(ValueError, match="particles have shape"):
        store.commit_step(0, particles_for(0)[:3])
    store.commit_step(0, particles_for(0))
    with pytest.raises(ValueError, match="already committed"):
        record(store, 0, 0, 0, psi_for(0, 0, 0), True)
    store.close()
    with pytest.raises(StoreError, match="not open for writing"):
        record(RunStore.open(path), 1, 0, 0, psi_for(1, 0, 0), True)


def test_uncommitted_step_is_invisible_and_members_count_only_when_complete(tmp_path):
    path = tmp_path / "run.zarr"
    with make(path) as store:
        run_steps(store, range(3))
        # a driver killed in step 3: some arrays written, the marker not; members 0-2 complete
        store.array("mean")[3] = 7.0
        store.array("particles")[3] = particles_for(3)
        for j in range(3):
            record(store, 3, 0, j, psi_for(3, 0, j), ok=j != 2, reason="nan" if j == 2 else None)
        store.array("psi")[3, 0, 3] = psi_for(3, 0, 3)  # psi without its status marker
        store.array("status")[3, 0, 4] = 1  # a marker without psi (never happens in order, still not counted)
    Path(path, "status", "c", "3", "0", "5.0123abcd.partial").write_bytes(b"\x01")  # a killed atomic write
    r = RunStore.open(path)
    assert r.committed_step == 2 and r.resume_state()[0] == 2
    assert open_xarray(path).sizes["step"] == 3 and len(r.read("mean")) == 3
    with pytest.raises(ValueError, match="not committed"):
        r.read("mean", 3)
    done = r.completed_members(3, 0)
    assert sorted(done) == [0, 1, 2]
    assert done[2][1:] == (False, "nan") and done[0][1:] == (True, None)
    np.testing.assert_array_equal(done[1][0], psi_for(3, 0, 1))
    assert r.completed_members(3, 1) == {}
    a = RunStore.open(path, "a")
    with pytest.raises(ValueError, match="next step to commit is 3"):
        a.commit_step(4, particles_for(4))
    a.close()


def test_bulk_records_and_urls_work():
    path = "memory://test-store/run.zarr"  # an fsspec URL, as s3://... would be with s3fs installed
    store = make(path)
    psi = np.stack([psi_for(0, 0, j) for j in range(J)])
    store.record_members(0, 0, range(J), psi, np.arange(J) != 3, [None, None, None, "timeout", None, None])
    store.commit_step(0, particles_for(0))
    store.close()
    r = RunStore.open(path)
    assert r.committed_step == 0 and (r.read("status", 0)[0] == [1, 1, 1, 2, 1, 1]).all()
    done = r.completed_members(0, 0)
    assert sorted(done) == list(range(J)) and done[3][1:] == (False, "timeout")
    assert np.array_equal(done[5][0], psi[5])
    assert open_xarray(path).sizes["step"] == 1


@pytest.fixture
def two_member_blocks(monkeypatch):
    """Member blocks of 2 rows of psi (3 float64), so J = 6 members make 3 blocks."""
    monkeypatch.setattr(layout, "_RECORD_BYTES", 2 * M * 8)


def test_member_blocks_arrive_in_any_order_and_a_new_process_adds_to_them(tmp_path, two_member_blocks):
    path = tmp_path / "run.zarr"
    with make(path) as store:
        assert store.array("psi").chunks == (1, 1, 2, M) and store.array("status").chunks == (1, 1, 2)
        store.record_members(0, 1, [4, 1], [psi_for(0, 1, 4), psi_for(0, 1, 1)], [True, False], [None, "nan"])
        record(store, 0, 1, 2, psi_for(0, 1, 2), True)
    with RunStore.open(path, "a") as store:  # a resumed driver: the blocks it writes keep the earlier members
        assert sorted(store.completed_members(0, 1)) == [1, 2, 4]
        store.record_members(0, 1, [5, 0], [psi_for(0, 1, 5), psi_for(0, 1, 0)], [True, True])
        record(store, 0, 1, 3, psi_for(0, 1, 3), False, "timeout")
    done = RunStore.open(path).completed_members(0, 1)
    assert sorted(done) == list(range(J)) and RunStore.open(path).completed_members(0, 0) == {}
    assert [done[j][1:] for j in (1, 3)] == [(False, "nan"), (False, "timeout")]
    for j in (0, 2, 4, 5):
        assert done[j][1:] == (True, None) and np.array_equal(done[j][0], psi_for(0, 1, j))
    with RunStore.open(path, "a") as store:  # a member reported ok with a non-finite output is recorded as failed
        record(store, 1, 0, 4, np.array([1.0, np.nan, 2.0]), True)
    assert RunStore.open(path).completed_members(1, 0)[4][1:] == (False, "non-finite forward output")
    with pytest.raises(ValueError, match="members outside"):
        record(RunStore.open(path, "a"), 1, 0, J, psi_for(1, 0, 0), True)
    with pytest.raises(ValueError, match=r"2 members but psi \(2, 4\)"):
        RunStore.open(path, "a").record_members(1, 0, [0, 1], np.zeros((2, M + 1)), [True, True])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_blocks_on_disk_are_listed_not_read(tmp_path, two_member_blocks, where):
    from enkg_dist.store.records import chunks_on_disk

    path = tmp_path / "run.zarr" if where == "local" else f"memory://listing-{tmp_path.name}/run.zarr"
    with make(path) as store:
        status = store.array("status")
        assert chunks_on_disk(status, 0, 1) == set()
        store.record_members(0, 1, [5, 0], [psi_for(0, 1, 5), psi_for(0, 1, 0)], [True, True])
        assert chunks_on_disk(status, 0, 1) == {0, 2} and chunks_on_disk(status, 0, 0) == set()
        assert chunks_on_disk(status, 1, 1) == set()


def test_a_damaged_member_block_is_run_again_and_rewritten_whole(tmp_path, two_member_blocks):
    path = tmp_path / "run.zarr"
    with make(path) as store:
        store.record_members(0, 0, range(J), [psi_for(0, 0, j) for j in range(J)], [True] * J)
    f = Path(path, "psi", "c", "0", "0", "1", "0")  # members 2 and 3
    data = bytearray(f.read_bytes())
    data[5] ^= 0xFF
    f.write_bytes(bytes(data))
    with RunStore.open(path, "a") as store:
        assert sorted(store.completed_members(0, 0)) == [0, 1, 4, 5]
        record(store, 0, 0, 3, psi_for(0, 0, 3), True)  # the block starts afresh: member 2 is not done
        assert sorted(store.completed_members(0, 0)) == [0, 1, 3, 4, 5]
        record(store, 0, 0, 2, psi_for(0, 0, 2), True)
    done = RunStore.open(path).completed_members(0, 0)
    assert all(np.array_equal(done[j][0], psi_for(0, 0, j)) for j in range(J))


def test_mean_and_spread_match_float64():
    x = (np.random.default_rng(0).standard_normal((300, 7, 5)) + 3).astype(np.float32)
    mean, std = mean_std(x, block=64)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, x.astype(np.float64).std(0, ddof=1), rtol=1e-5)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(mean_std(xd, block=7)[1], xd.std(0, ddof=1), rtol=1e-12)
    assert (mean_std(x[:1])[1] == 0).all()


CHILD = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from test_store import particles_for, psi_for, record, K, J
from enkg_dist.store import RunStore
store = RunStore.open(sys.argv[1], "a")
print("ready", flush=True)
for t in range(store.num_steps):
    for j in range(J):
        record(store, t, 0, j, psi_for(t, 0, j), True)
    store.commit_step(t, particles_for(t), {"sigma": float(t)})
store.close()
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("full_every", [1, 3])
def test_sigkill_at_random_moments(tmp_path, full_every):
    rnd, delays, reached = random.Random(), [], []
    for attempt in range(2):
        path = tmp_path / f"run{attempt}.zarr"
        make(path, num_steps=5000, full_every=full_every).close()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(Path(__file__).parent)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        delays.append(rnd.uniform(0.1, 1.2))
        time.sleep(delays[-1])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL, f"the child ended before the kill: {child.stderr.read()}"

        r = RunStore.open(path)  # opens and verifies: a kill never damages a committed step
        step, x = r.resume_state()
        reached.append(step)
        assert step == r.committed_step, delays
        if step >= 0:
            np.testing.assert_array_equal(x, particles_for(step), err_msg=f"delays {delays}")
        for j, (psi, ok, _) in r.completed_members(step + 1, 0).items():
            assert ok and np.array_equal(psi, psi_for(step + 1, 0, j)), delays

        with RunStore.open(path, "a") as a:  # the run goes on from the step after the committed one
            a.commit_step(step + 1, particles_for(step + 1))
            a.commit_step(step + 2, particles_for(step + 2))
        s, x = RunStore.open(path).resume_state()
        assert s == step + 2 and np.array_equal(x, particles_for(step + 2))
    assert max(reached) >= 0, f"no step was committed before any kill (delays {delays})"


@pytest.mark.parametrize("array, damage", [("mean", "flip"), ("std", "truncate"), ("particles", "delete"),
                                           ("particles", "flip")])
def test_corruption_is_reported_and_resume_falls_back(tmp_path, array, damage):
    path = tmp_path / "run.zarr"
    with make(path) as store:
        run_steps(store, range(5))
    f = chunk_file(path, array, 4, 4 if array == "particles" else 3)
    data = bytearray(f.read_bytes())
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match=rf"array '{array}' step 4: chunk .* (is missing|does not decode)"):
        RunStore.open(path)
    with pytest.warns(UserWarning, match="falling back to step 3"):
        r = RunStore.open(path, on_damage="fallback")
    assert "\n" not in r.damage and f"array '{array}' step 4" in r.damage
    assert r.last_intact_step() == 3
    step, x = r.resume_state()
    assert step == 3 and np.array_equal(x, particles_for(3))
    with pytest.warns(UserWarning):
        a = RunStore.open(path, "a", on_damage="fallback")  # moves the marker back and redoes step 4
    assert a.committed_step == 3
    a.commit_step(4, particles_for(4))
    a.close()
    assert RunStore.open(path).resume_state()[0] == 4


def test_every_member_block_of_a_step_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "_CHUNK_BYTES", 2 * int(np.prod(SHAPE)) * 8)  # 2 members a chunk
    path = tmp_path / "run.zarr"
    with make(path) as store:
        assert store.array("particles").chunks == (1, 2, *SHAPE)
        run_steps(store, range(3))
    Path(path, "particles", "c", "2", "1", "0", "0").unlink()
    with pytest.raises(StoreIntegrityError, match="array 'particles' step 2: chunk 'particles/c/2/1/0/0' is missing"):
        RunStore.open(path)
    with pytest.warns(UserWarning, match="falling back to step 1"):
        assert RunStore.open(path, on_damage="fallback").resume_state()[0] == 1


def test_retention_keeps_every_third_step_and_resumes_through_the_slots(tmp_path):
    path = tmp_path / "run.zarr"
    with make(path, num_steps=8, full_every=3) as store:
        assert [s for s in range(8) if store.is_kept(s)] == [2, 5, 7]
        run_steps(store, range(7))
    r = RunStore.open(path)
    stored = sorted(int(p.name) for p in Path(path, "particles", "c").iterdir())
    assert stored == [2, 5]
    assert np.isnan(r.read("particles", 4)).all() and np.array_equal(r.read("particles", 5), particles_for(5))
    assert not np.isnan(r.read("mean")).any() and r.read("std").shape == (7, *SHAPE)
    step, x = r.resume_state()
    assert step == 6 and np.array_equal(x, particles_for(6))
    slot = r.attrs["resume_slot"]
    assert r.array("resume/step")[slot] == 6

    with RunStore.open(path, "a") as a:  # the last step is always kept
        a.commit_step(7, particles_for(7))
    assert np.array_equal(RunStore.open(path).read("particles", 7), particles_for(7))


def test_a_damaged_resume_slot_falls_back_to_the_newest_intact_ensemble(tmp_path):
    path = tmp_path / "run.zarr"
    with make(path, num_steps=8, full_every=3) as store:
        run_steps(store, range(5))  # step 3 in one slot, step 4 in the other, step 2 kept
    r = RunStore.open(path)
    slot = r.attrs["resume_slot"]
    assert sorted(r.array("resume/step")[:]) == [3, 4] and r.array("resume/step")[slot] == 4
    chunk_file(path, "resume/particles", slot, 4).unlink()
    with pytest.warns(UserWarning, match="array 'resume/particles' step 4: chunk .* is missing"):
        r = RunStore.open(path, on_damage="fallback")
    step, x = r.resume_state()
    assert step == 3 and np.array_equal(x, particles_for(3))  # from the other slot, stamped 3


def test_writer_error_surfaces_on_the_next_call(tmp_path, monkeypatch):
    store = make(tmp_path / "run.zarr")
    run_steps(store, range(2))
    store.flush()

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(store, "_write_arrays", disk_full)
    store.commit_step(2, particles_for(2))  # returns: the failure happens in the writer
    store._writer.join()
    with pytest.raises(WriterError, match=r"step 2 failed \(OSError: No space left on device\); committed up to "
                                          r"step 1"):
        record(store, 3, 0, 0, psi_for(3, 0, 0), True)
    with pytest.raises(WriterError):
        store.commit_step(3, particles_for(3))
    with pytest.raises(WriterError):
        store.close()
    assert RunStore.open(tmp_path / "run.zarr").committed_step == 1


def test_commit_is_off_the_critical_path_with_bounded_queue(tmp_path, monkeypatch):
    store = make(tmp_path / "run.zarr", max_pending=1)
    gate, original = threading.Event(), store._write_arrays

    def slow(*args):
        gate.wait(10)
        return original(*args)

    monkeypatch.setattr(store, "_write_arrays", slow)
    t0 = time.perf_counter()
    store.commit_step(0, particles_for(0))  # taken by the writer, which waits
    store.commit_step(1, particles_for(1))  # fills the queue
    assert time.perf_counter() - t0 < 2.0
    third = threading.Thread(target=store.commit_step, args=(2, particles_for(2)))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third pending step must wait for room in the queue"
    gate.set()
    third.join(10)
    store.close()
    assert RunStore.open(tmp_path / "run.zarr").committed_step == 2


def test_config_diff_lists_dotted_keys(tmp_path):
    store = make(tmp_path / "run.zarr")
    new = {"name": "other", "seed": 0, "enkg": {"scale": 1.0, "num_steps": 8}, "execution": {"num_workers": 8},
           "chaos": {"fail_rate": 0.1}}
    assert store.config_diff(new, ignore=("name", "execution")) == ["chaos.fail_rate", "enkg.scale"]
    assert store.config_diff(new, ignore=("chaos",)) == ["enkg.scale", "execution.num_workers", "name"]
    assert store.config_diff(CONFIG) == []
    store.close()


def test_deferred_writes_wait_for_a_window_a_full_queue_or_a_flush(tmp_path):
    path = tmp_path / "run.zarr"
    store = make(path, max_pending=1, defer_writes=True)

    def committed_on_disk():
        return RunStore.open(path, verify=False).committed_step

    store.commit_step(0, particles_for(0))
    time.sleep(0.3)
    assert committed_on_disk() == -1, "a deferred step is written before any window"
    with store.write_window():  # the forward evaluations of the next step
        deadline = time.monotonic() + 10
        while committed_on_disk() < 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert committed_on_disk() == 0
    for t in (1, 2, 3):  # no window at all: a full queue lets the writer go on, so commit_step never deadlocks
        store.commit_step(t, particles_for(t))
    assert committed_on_disk() >= 1
    store.flush()
    assert committed_on_disk() == 3
    store.close()
    np.testing.assert_array_equal(RunStore.open(path).resume_state()[1], particles_for(3))


def test_checkpoint_every_writes_ensembles_sparsely_and_resume_replays_from_the_newest(tmp_path):
    path = tmp_path / "run.zarr"
    with make(path, num_steps=9, full_every=9, checkpoint_every=3) as store:
        assert [s for s in range(9) if store.is_checkpoint(s)] == [2, 5, 8]
        run_steps(store, range(5))  # ensembles of step 2 only (in a slot); steps 3 and 4 have records and means
    r = RunStore.open(path)
    assert r.committed_step == 4 and r.attrs["ensemble_step"] == 2 and r.records_until == 5
    assert sorted(r.array("resume/step")[:]) == [-1, 2]
    step, x = r.resume_state()
    assert step == 2 and np.array_equal(x, particles_for(2))
    np.testing.assert_allclose(r.read("mean", 4), particles_for(4).mean(0))
    a = RunStore.open(path, "a", checkpoint_every=3)  # a resume: back to the ensemble, replay steps 3 and 4
    assert a.committed_step == 2 and a.records_until == 5 and sorted(a.completed_members(4, 1)) == list(range(J))
    a.close()
    again = RunStore.open(path, "a", checkpoint_every=2)  # killed before replaying: the records are still known
    assert again.committed_step == 2 and again.records_until == 5
    run_steps(again, range(3, 6))  # with checkpoint_every = 2: step 3 and 5 go to the slots
    again.close()
    r = RunStore.open(path)
    assert r.attrs["ensemble_step"] == 5 and sorted(r.array("resume/step")[:]) == [3, 5]
    assert r.resume_state()[0] == 5 and r.records_until == 6
    with pytest.raises(ValueError, match="checkpoint_every"):
        RunStore.open(path, checkpoint_every=0)


# ---- creation that a kill cannot wedge, and the root metadata's recovery copy


@pytest.mark.parametrize("point", ["root", "arrays-made", "recovery", "marker"])
def test_a_creation_stopped_at_any_stage_is_never_taken_for_a_store(tmp_path, point, monkeypatch):
    """In-process: a creation that fails at a stage leaves nothing at the store's name (the kill version, with a
    real SIGKILL, is in test_store_creation.py)."""
    from enkg_dist.store import probe, runstore

    class Stop(Exception):
        pass

    def hook(p):
        if p == point:
            raise Stop

    monkeypatch.setattr(runstore, "CREATE_HOOK", hook)
    path = tmp_path / "run.zarr"
    with pytest.raises(Stop):
        make(path)
    assert probe(path) == "absent" and not path.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(runstore, "CREATE_HOOK", None)
    make(path).close()
    assert probe(path) == "store" and RunStore.open(path).committed_step == -1


def test_a_half_created_store_under_an_url_lacks_its_creation_marker():
    """Where no rename is atomic (fsspec URLs), format_version is written last: without it the store is
    'half-created', and discard_half_created removes it."""
    import zarr

    from enkg_dist.store import discard_half_created, probe

    path = "memory://half/run.zarr"
    zarr.open_group(path, mode="w-", attributes={"creating": True, "committed_step": -1})
    assert probe(path) == "half-created"
    with pytest.raises(StoreError, match="creation was interrupted"):
        RunStore.open(path)
    discard_half_created(path)
    assert probe(path) == "absent"
    make(path).close()
    assert probe(path) == "store"


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_a_lost_or_truncated_root_zarr_json_costs_no_committed_step(tmp_path, damage):
    from enkg_dist.store import committed_step_of, probe

    path = tmp_path / "run.zarr"
    with make(path, full_every=3) as store:
        run_steps(store, range(5))
    root = path / "zarr.json"
    if damage == "delete":
        root.unlink()
    elif damage == "truncate":
        root.write_bytes(root.read_bytes()[:37])
    else:
        root.write_bytes(b"\x00\x01 not json")
    damaged = root.read_bytes() if root.exists() else None
    assert probe(path) == "root-damaged" and committed_step_of(path) == 4
    r = RunStore.open(path)  # read-only: from the recovery copy, nothing written
    assert r.committed_step == 4 and r.resume_state()[0] == 4 and r.config == CONFIG
    assert np.array_equal(r.resume_state()[1], particles_for(4))
    assert (root.read_bytes() if root.exists() else None) == damaged  # a reader writes nothing
    assert open_xarray_fails_clearly(path)
    with pytest.warns(UserWarning, match="rebuilt from its recovery copy \\(committed step 4\\)"):
        a = RunStore.open(path, "a")
    run_steps(a, [5])
    a.close()
    assert probe(path) == "store" and RunStore.open(path).resume_state()[0] == 5
    assert open_xarray(path).sizes["step"] == 6


def open_xarray_fails_clearly(path) -> bool:
    """A reader that needs the root (xarray) says what to do, in one line."""
    with pytest.raises(StoreError, match="cannot be read .*`enkg-dist resume` rebuilds it") as e:
        open_xarray(path)
    return "\n" not in str(e.value)


def test_root_and_recovery_both_lost_is_a_clear_error(tmp_path):
    from enkg_dist.store import probe

    path = tmp_path / "run.zarr"
    with make(path) as store:
        run_steps(store, range(2))
    (path / "zarr.json").unlink()
    (path / "recovery" / "zarr.json").unlink()
    assert probe(path) == "damaged"
    with pytest.raises(StoreError, match="missing or unreadable and so is its recovery copy") as e:
        RunStore.open(path, "a")
    assert "\n" not in str(e.value)


def test_verify_store_names_array_step_and_file_of_each_bad_chunk(tmp_path):
    from enkg_dist.store import verify_store

    path = tmp_path / "run.zarr"
    with make(path, full_every=3) as store:
        run_steps(store, range(6))
    assert verify_store(path) == []
    flipped = chunk_file(path, "particles", 2, 4)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    chunk_file(path, "mean", 4, 3).unlink()
    status = Path(path, "status", "c", "1", "1", "0")
    status.write_bytes(status.read_bytes()[:-3])
    bad = {(b.array, b.step): b for b in verify_store(path)}
    assert set(bad) == {("particles", 2), ("mean", 4), ("status", 1)}
    assert bad["particles", 2].file == str(flipped) and "CRC32C checksum mismatch" in bad["particles", 2].problem
    assert bad["mean", 4].problem == "missing" and bad["status", 1].file == str(status)
    assert bad["mean", 4].line() == f"array 'mean' step 4: {chunk_file(path, 'mean', 4, 3)}: missing"
    assert [b.array for b in verify_store(path, arrays=["mean"])] == ["mean"]


def test_a_store_is_created_into_an_empty_directory_but_never_over_anything_else(tmp_path):
    path = tmp_path / "run.zarr"
    path.mkdir()
    make(path).close()
    assert RunStore.open(path).committed_step == -1
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="already exists"):
        make(other)
    assert (other / "precious.txt").read_text() == "x"
