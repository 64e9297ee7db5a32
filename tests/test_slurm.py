"""SLURM: launch checks, global batch, rank-disjoint data, preemption, and a real local cluster.

Fast tier: nova3d.slurm's checks and sbatch command, the DataModule's per-rank shares, the
preemption callback in a plain Lightning fit (SIGUSR1 to ourselves), the manifest merge.
Slow tier (root; `make setup-slurm` installs SLURM): munged + slurmctld + two slurmd on localhost
(tests/slurm_cluster.py). One training job, EXP=tiny with 2 tasks on 2 nodes (gloo on loopback),
is preempted with `scancel --signal=USR1` at a known step, requeued and finished; several tests read
its record (each launch costs ~40 s of imports on a loaded 2-core machine, so they share one).
Then a mismatched allocation that must fail before srun, and a 2-task render array + merge job.
"""
from __future__ import annotations

import json
import os
import signal
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from data_prep.array_task import all_sources, run_task, task_dir_name
from data_prep.merge_manifests import merge
from data_prep.objaverse_lvis import shard_slice
from data_prep.render_io import RenderSettings
from data_prep.write_shards import write_shards
from nova3d.config import DataConfig, load_experiment
from nova3d.data.datamodule import MultiViewDataModule, rank_share
from nova3d.data.manifest import Manifest, resolve_shards
from nova3d.errors import Nova3DError
from nova3d.preemption import PreemptionCheckpoint
from nova3d.slurm import Allocation, SlurmLaunchError, apply_global_batch, check_allocation, sbatch_command
from nova3d.slurm import main as slurm_main
from tests.helpers_objects import make_object_folder
from tests.slurm_cluster import SlurmCluster, free_port, unavailable_reason

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
NUM_OBJECTS, MAX_STEPS, PAUSE_AT = 4, 4, 2
JOB_TIMEOUT_S = 420


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """This process is never inside a SLURM job, even when pytest runs in one."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    for i in range(NUM_OBJECTS):
        make_object_folder(root, f"obj{i}", views=4, res=32, seed=i)
    return root


@pytest.fixture(scope="module")
def shards(renders, tmp_path_factory) -> Path:
    """4 tiny objects, one per shard: with 2 ranks each owns 2 shards."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(renders, out, max_count=1, progress=False)
    return out


def _env(**slurm) -> dict[str, str]:
    return {f"SLURM_{k.upper()}": str(v) for k, v in slurm.items()}


# --- launch checks (fast) ---------------------------------------------------------------------

def test_allocation_must_match_trainer_nodes_and_devices():
    cfg = load_experiment("tiny", ["trainer.num_nodes=2", "trainer.devices=4", "trainer.accelerator=gpu",
                                   "data.global_batch_size=16"])
    alloc = Allocation.from_env(_env(job_id=7, job_num_nodes=2, ntasks=8, ntasks_per_node=4, gpus_on_node=4))
    assert alloc == Allocation("7", 2, 8, 4, 4)
    assert check_allocation(cfg, alloc) == 2  # 16 over 8 ranks
    assert Allocation.from_env({}) is None
    assert Allocation.from_env(_env(job_id=1, nnodes=3, ntasks_per_node="2(x3)", ntasks=6)).tasks_per_node == 2
    bad = {
        "num_nodes=2 but job 7 has 1 node": dict(job_num_nodes=1, ntasks=4, ntasks_per_node=4),
        "devices=4 but job 7 runs 2 task": dict(job_num_nodes=2, ntasks=4, ntasks_per_node=2),
        "without --ntasks-per-node": dict(job_num_nodes=2, ntasks=8),
        "1 GPU": dict(job_num_nodes=2, ntasks=8, ntasks_per_node=4, gpus_on_node="a100:1"),
        "different task counts": dict(job_num_nodes=2, ntasks=3, ntasks_per_node="2,1"),
    }
    for message, env in bad.items():
        with pytest.raises(SlurmLaunchError, match=message):
            check_allocation(cfg, Allocation.from_env(_env(job_id=7, **env)))
    auto = load_experiment("tiny", ["trainer.devices=auto"])
    with pytest.raises(SlurmLaunchError, match="trainer.devices='auto'"):
        check_allocation(auto, Allocation.from_env(_env(job_id=7, job_num_nodes=1, ntasks=1)))
    single = load_experiment("tiny")  # 1 node x 1 device, no --ntasks-per-node needed
    assert check_allocation(single, Allocation.from_env(_env(job_id=7, job_num_nodes=1, ntasks=1))) == 1


def test_global_batch_is_divided_over_ranks_and_accumulation():
    cfg = load_experiment("tiny", ["data.global_batch_size=12", "trainer.accumulate_grad_batches=2"])
    assert apply_global_batch(cfg, world=3).data.batch_size == 2
    assert apply_global_batch(cfg, world=6).data.batch_size == 1
    with pytest.raises(SlurmLaunchError, match="global_batch_size=12 does not divide over 4 rank"):
        apply_global_batch(cfg, world=4)
    plain = load_experiment("tiny", ["data.batch_size=3"])
    assert apply_global_batch(plain, world=8) is plain  # unset: batch_size is per rank, as before


def test_sbatch_command_takes_its_sizes_from_the_config():
    overrides = ["trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=gpu"]
    cfg = load_experiment("ablations/no_gta", overrides)
    command = sbatch_command(cfg, "ablations/no_gta", overrides, ["--time=1:00:00"])
    assert command[:6] == ["sbatch", "--job-name=nova3d-ablations-no_gta", "--nodes=2", "--ntasks-per-node=8",
                           "--gpus-per-node=8", "--time=1:00:00"]
    assert command[6].endswith("experiments/slurm/train.sbatch") and command[7:] == ["ablations/no_gta", *overrides]
    cpu = load_experiment("tiny", ["trainer.devices=2"])
    assert not any(a.startswith("--gpus") for a in sbatch_command(cpu, "tiny"))
    with pytest.raises(SlurmLaunchError, match="global_batch_size=3"):
        sbatch_command(load_experiment("tiny", ["trainer.devices=2", "data.global_batch_size=3"]), "tiny")


def test_cli_submit_dry_run_and_check(capsys, monkeypatch):
    assert slurm_main(["submit", "tiny", "trainer.devices=2", "--dry-run", "--sbatch-args=-p cpu"]) == 0
    assert capsys.readouterr().out.startswith("sbatch --job-name=nova3d-tiny --nodes=1 --ntasks-per-node=2 -p cpu ")
    assert slurm_main(["check", "tiny"]) == 2
    assert "check: error: environment: not inside a SLURM job" in capsys.readouterr().err
    for key, value in _env(job_id=5, job_num_nodes=1, ntasks=2, ntasks_per_node=2).items():
        monkeypatch.setenv(key, value)
    assert slurm_main(["check", "tiny", "trainer.devices=2"]) == 0
    assert slurm_main(["check", "tiny"]) == 2
    assert "trainer.devices=1 but job 5 runs 2 task(s) per node" in capsys.readouterr().err


# --- rank-disjoint training data (fast) -------------------------------------------------------

def _rank_ids(spec: str, rank: int, world: int, monkeypatch, batches: int = 4) -> tuple[list[int], set[str]]:
    dm = MultiViewDataModule(DataConfig(train_shards=spec, resolution=16, num_views=2, batch_size=1, num_workers=0,
                                        samples_per_epoch=batches, shuffle_buffer=1))
    monkeypatch.setattr(dm, "_rank_world", lambda: (rank, world))
    torch.manual_seed(rank)  # shards are drawn with replacement, seeded from torch's RNG: not from earlier tests
    dm.setup("fit")
    got = list(dm.train_dataloader())
    return [len(b) for b in got], {oid for b in got for oid in b.object_ids}


@pytest.mark.parametrize("one_shard", [False, True], ids=["shards_split", "samples_split"])
def test_ranks_train_on_disjoint_samples_for_the_same_steps(renders, shards, one_shard, monkeypatch, tmp_path):
    if one_shard:  # fewer shards than ranks: each rank keeps every world-th sample of the shard
        write_shards(renders, tmp_path, progress=False)
    spec = str(tmp_path if one_shard else shards)
    # 16 draws with replacement from a rank's 2 shards miss one with probability 2^-15
    seen = [_rank_ids(spec, r, 2, monkeypatch, batches=16) for r in range(2)]
    assert seen[0][0] == seen[1][0] == [1] * 16  # the same number of steps
    assert not seen[0][1] & seen[1][1] and len(seen[0][1] | seen[1][1]) == NUM_OBJECTS
    assert rank_share(["a", "b", "c"], 1, 2) == (["b"], (0, 1))
    assert rank_share(["a"], 1, 2) == (["a"], (1, 2))


def test_fewer_samples_than_ranks_fails_instead_of_spinning(tmp_path, monkeypatch):
    make_object_folder(tmp_path / "r", "only", views=4, res=32)
    write_shards(tmp_path / "r", tmp_path / "s", progress=False)
    with pytest.raises(Nova3DError, match="rank 1 of 2 got no sample"):
        _rank_ids(str(tmp_path / "s"), 1, 2, monkeypatch)


# --- preemption callback without SLURM (fast) --------------------------------------------------

class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _SignalAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)  # as `scancel --signal=USR1` delivers it


def test_signal_saves_at_the_next_step_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    preemption = PreemptionCheckpoint(tmp_path)
    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0,
                                                   every_n_train_steps=100),
                                   preemption, _SignalAt(2)])
    (tmp_path / "hpc_ckpt_4.ckpt").write_bytes(b"an older preemption's")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4))
    assert preemption.requested and trainer.global_step == 3  # the step after the signal, then stop
    assert preemption.saved == tmp_path / "hpc_ckpt_5.ckpt"
    assert sorted(p.name for p in tmp_path.rglob("*ckpt*")) == ["hpc_ckpt_5.ckpt"]  # no last.ckpt, no .tmp
    ckpt = torch.load(preemption.saved, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {3.0}
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored after the fit


# --- merging per-task manifests (fast) ---------------------------------------------------------

def test_merge_task_manifests(tmp_path):
    shards_dir = tmp_path / "shards"
    ids = [f"obj{i}" for i in range(5)]
    for task in range(2):
        renders = tmp_path / "renders" / task_dir_name(task, 2)
        for oid in shard_slice(ids, task, 2):
            make_object_folder(renders, oid, views=2, res=16)
        write_shards(renders, shards_dir / task_dir_name(task, 2), max_count=2, progress=False)
    manifest = Manifest.load(merge(shards_dir))
    assert sorted(o for s in manifest.shards for o in s.objects) == ids
    assert manifest.splits["train"]["num_samples"] == 5 and manifest.splits["train"]["num_shards"] == 3
    paths = resolve_shards(shards_dir, split="train")
    assert len(paths) == 3 and all(Path(p).is_file() for p in paths)

    (shards_dir / "task-0000-of-0003").mkdir()
    with pytest.raises(Nova3DError, match=r"array sizes \[2, 3\]"):
        merge(shards_dir)
    (shards_dir / "task-0000-of-0003").rmdir()
    (shards_dir / task_dir_name(1, 2) / "manifest.json").rename(tmp_path / "kept.json")
    with pytest.raises(Nova3DError, match="1 of 2 tasks have no manifest"):
        merge(shards_dir)
    assert Manifest.load(merge(shards_dir, allow_missing=True)).splits["train"]["num_samples"] == 3
    first = (shards_dir / task_dir_name(0, 2) / "manifest.json").read_text()
    (shards_dir / task_dir_name(1, 2) / "manifest.json").write_text(first)  # task 1 claims task 0's objects
    with pytest.raises(Nova3DError, match="object 'obj0' is also in"):
        merge(shards_dir)


# --- a real SLURM cluster (slow, root) ---------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason and os.geteuid() != 0:
        pytest.skip(reason)
    if reason:  # as root (CI) a missing install is a failure, not a silent skip
        pytest.fail(reason)
    with SlurmCluster.start(tmp_path_factory.mktemp("slurm"), nodes=2) as running:
        yield running


def _job_env(probe: Path, **extra) -> dict[str, str]:
    return {"NOVA3D_TRAIN_ENTRY": "tests.slurm_probe", "NOVA3D_PROBE_DIR": str(probe), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_PORT": str(free_port()),
            "NOVA3D_PYTHON": str(REPO / ".venv" / "bin" / "python"), **extra}


def _tiny(shards: Path, root: Path, nodes: int, devices: int) -> list[str]:
    """EXP=tiny on CPU/gloo at 32², 4 views, MAX_STEPS steps, no validation, no step checkpoints."""
    return ["model.pretrained=null", "model.architecture=tiny", "data.resolution=32", "data.num_views=4",
            f"data.train_shards={shards}", "data.num_workers=0", f"data.global_batch_size={nodes * devices}",
            "data.samples_per_epoch=8", "data.shuffle_buffer=2", "trainer.accelerator=cpu", "trainer.strategy=ddp",
            f"trainer.num_nodes={nodes}", f"trainer.devices={devices}", "trainer.precision=32-true",
            f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=1000", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", "trainer.checkpoint_every_n_steps=1000", "trainer.log_every_n_steps=1",
            f"logging.root={root}"]


def _wait_for(paths: list[Path], cluster: SlurmCluster, job: str, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not all(p.exists() for p in paths):
        states = cluster.states(job)
        if time.monotonic() > deadline or any(s not in ("PENDING", "RUNNING") for s in states.values()):
            pytest.fail(f"job {job} is {states} before {[p.name for p in paths]}; log:\n"
                        f"{log.read_text()[-3000:] if log.exists() else '(none)'}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def preempted_run(cluster, shards, tmp_path_factory) -> dict:
    """train.sbatch EXP=tiny, 2 nodes x 1 task; USR1 once both ranks finished step PAUSE_AT; requeued; done."""
    root = tmp_path_factory.mktemp("train")
    probe, runs, log = root / "probe", root / "runs", root / "job.out"
    probe.mkdir()
    job = cluster.sbatch([f"--output={log}", "--nodes=2", "--ntasks-per-node=1", "experiments/slurm/train.sbatch",
                          "tiny", *_tiny(shards, runs, nodes=2, devices=1)],
                         env=_job_env(probe, NOVA3D_PROBE_PAUSE_AT=str(PAUSE_AT)), cwd=REPO)
    _wait_for([probe / f"paused-rank{r}" for r in range(2)], cluster, job, log)
    cluster.run(["scancel", "--signal=USR1", job])
    states = cluster.wait(job, timeout=JOB_TIMEOUT_S)
    records = [json.loads(line) for path in sorted(probe.glob("rank*.jsonl")) for line in path.read_text().splitlines()]
    return {"job": job, "states": states, "info": cluster.job_info(job), "log": log.read_text(),
            "records": records, "run": runs / "tiny" / job}


def _steps(records: list[dict], rank: int, restart: int) -> list[int]:
    return [r["step"] for r in records if r["rank"] == rank and r["restart"] == restart and r["event"] == "step"]


@pytest.mark.slow
def test_two_ranks_on_two_nodes_see_disjoint_samples_and_take_the_same_steps(preempted_run):
    run = preempted_run
    assert run["states"] == {run["job"]: "COMPLETED"}, run["log"][-3000:]
    records = [r for r in run["records"] if r["event"] == "step"]
    assert {(r["rank"], r["node"], r["world"]) for r in records} == {(0, 0, 2), (1, 1, 2)}  # one rank per node
    ids = [{i for r in records if r["rank"] == rank for i in r["ids"]} for rank in range(2)]
    assert ids[0] == {"obj0", "obj2"} and ids[1] == {"obj1", "obj3"}  # rank r owns shards r, r + 2
    for restart in (0, 1):
        assert _steps(records, 0, restart) == _steps(records, 1, restart)
    assert all(len(r["ids"]) == 1 for r in records)  # data.global_batch_size=2 over 2 ranks
    assert "2 node(s) x 1 task(s) = 2 rank(s); batch 1 per rank, 2 per optimizer step" in run["log"]


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes_from_the_saved_step(preempted_run):
    run = preempted_run
    assert "Restarts=1" in run["info"], run["info"]
    assert f"nova3d: requeueing SLURM job {run['job']}" in run["log"], run["log"][-3000:]
    records = run["records"]
    saved = PAUSE_AT + 1  # the signal is acted on at the end of the next step, on every rank
    for rank in range(2):
        assert _steps(records, rank, 0) == list(range(1, saved + 1))
        starts = [r["step"] for r in records if r["rank"] == rank and r["event"] == "start"]
        assert starts == [0, saved]  # the requeued launch starts at the saved global step
        assert _steps(records, rank, 1) == list(range(saved + 1, MAX_STEPS + 1))  # no step repeated or lost
    hpc = torch.load(run["run"] / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] == saved
    assert f"resuming from {run['run'] / 'hpc_ckpt_1.ckpt'}" in run["log"]


@pytest.mark.slow
def test_exactly_one_final_checkpoint(preempted_run):
    run = preempted_run
    assert sorted(p.name for p in (run["run"] / "checkpoints").iterdir()) == ["last.ckpt"]
    final = torch.load(run["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == MAX_STEPS
    # Adam's step count is the number of updates behind these weights: none lost or repeated.
    assert {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()} == {float(MAX_STEPS)}
    assert sorted(p.name for p in run["run"].glob("*.ckpt*")) == ["hpc_ckpt_1.ckpt"]


@pytest.mark.slow
def test_allocation_mismatch_fails_before_launch(cluster, shards, tmp_path):
    log = tmp_path / "job.out"
    job = cluster.sbatch([f"--output={log}", "--nodes=1", "--ntasks-per-node=1", "experiments/slurm/train.sbatch",
                          "tiny", *_tiny(shards, tmp_path / "runs", nodes=1, devices=2)],
                         env=_job_env(tmp_path), cwd=REPO)
    assert cluster.wait(job, timeout=120) == {job: "FAILED"}
    text = log.read_text()
    assert "nova3d.slurm check: error: experiment tiny: trainer.devices=2 but job" in text
    assert "train.sbatch: job" not in text and not (tmp_path / "runs").exists()  # srun never ran


@pytest.mark.slow
def test_render_array_writes_shards_per_task_and_one_manifest(cluster, tmp_path):
    out, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    env = {"OMP_NUM_THREADS": "1", "NOVA3D_PYTHON": str(REPO / ".venv" / "bin" / "python")}
    flags = ["--procedural", "--resolution", "32", "--views", "4", "--samples", "1", "--no-denoise"]
    array = cluster.sbatch([f"--output={logs}/render-%A_%a.out", "--array=0-1", "experiments/slurm/render.sbatch",
                            "--out", str(out), *flags], env=env, cwd=REPO)
    merged = cluster.sbatch([f"--output={logs}/merge.out", f"--dependency=afterok:{array}",
                             "experiments/slurm/render.sbatch", "--merge", str(out)], env=env, cwd=REPO)
    text = lambda: "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))  # noqa: E731
    assert set(cluster.wait(array, timeout=JOB_TIMEOUT_S).values()) == {"COMPLETED"}, text()[-3000:]
    assert cluster.wait(merged, timeout=120) == {merged: "COMPLETED"}, text()[-3000:]

    sources = all_sources(None, [])
    manifest = Manifest.load(out / "shards")
    by_task = {}
    for shard in manifest.shards:
        by_task.setdefault(shard.name.split("/")[0], []).extend(shard.objects)
    for task in range(2):  # each task packed exactly its own slice, in its own folder
        expected = sorted(s.object_id for s in shard_slice(sources, task, 2))
        assert sorted(by_task[task_dir_name(task, 2)]) == expected
    assert manifest.splits["train"]["num_samples"] == len(sources) == 9
    assert len(resolve_shards(out / "shards", split="train")) == len(manifest.shards)

    # Rerunning a task (here in-process) renders nothing and keeps its shards.
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.tar")}
    settings = RenderSettings(views=4, resolution=32, samples=1, denoise=False)
    summary = run_task(out, sources, settings, 1, 2, progress=False)
    assert summary["rendered"] == 0 and summary["skipped"] == 4 and summary["shards"] == "kept"
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.tar")} == before
