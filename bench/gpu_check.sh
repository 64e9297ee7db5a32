#!/usr/bin/env bash
# One GPU check (issue 14): everything the project could not run without a GPU, in <= 8 minutes on
# one H100/H200. Each part is time-boxed and appends its result to one JSON file as soon as it
# finishes, so a time-out or a crash still leaves the figures of the parts before it.
#
#   bash bench/gpu_check.sh [--out FILE]           # on a GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run [--out FILE]   # every part at toy size on CPU; exits 0
#
# Parts (seconds allowed on a GPU):
#   pytest_gpu     75   pytest -m gpu (tests that need CUDA)
#   render_eval    85   evaluation renders: nvdiffrast against pytorch3d on one mesh (mask IoU, colour error;
#                       nvdiffrast compiles its CUDA kernels on first use)
#   gta_step       95   bench/gta_step.py --gpu --quick: SVD-xt UNet at 512², bf16, checkpointing, GTA vs vanilla
#   train_steps   115   3 training steps of gta_full with random SVD-xt weights (loss finite, peak memory
#                       against bench/memory_ladder.py's prediction, 33.1 GiB)
#   fusion         70   bench/fusion_speed.py --device cuda --quick (target <= 30 s)
#   blender        30   Cycles GPU render of one object, 16 views at 256²
# The last line printed is the whole JSON object (each part: status ok|failed|timeout|skipped, seconds, figures);
# the exit status is 0 when every part is ok or skipped (the dry run on a working CPU checkout: 0).
# The dry run uses the same code paths at toy sizes: test_precision.py only, the torch rasteriser
# against pytorch3d, gta_step's GPU path on CPU with the tiny UNet, the tiny architecture, 20 fusion steps, CPU Cycles.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) shift; [ $# -gt 0 ] || { echo "gpu_check.sh: error: --out needs a file name" >&2; exit 2; }; OUT="$1" ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: error: unknown option $1 (use --cpu-dry-run or --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if [ -z "$OUT" ]; then
  OUT="$REPO/outputs/bench/gpu_check.json"
fi
mkdir -p "$(dirname "$OUT")"
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  MODE=cpu-dry-run
else
  MODE=gpu
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: error: no CUDA device (run with --cpu-dry-run to test the script on CPU)" >&2
    exit 1
  fi
fi

# record PART STATUS SECONDS LOGFILE: the part's last JSON line (if any) goes into OUT under PART.
record() {
  "$PY" - "$OUT" "$1" "$2" "$3" "$4" "$MODE" <<'EOF'
import json, os, sys
out, part, status, seconds, log, mode = sys.argv[1:7]
try:
    data = json.load(open(out))
except (OSError, ValueError):
    data = {"check": "gpu_check", "mode": mode, "parts": {}}
figures = None
try:
    for line in reversed(open(log, errors="replace").read().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            figures = json.loads(line)
            break
except (OSError, ValueError):
    pass
entry = {"status": status, "seconds": float(seconds)}
if figures is not None:
    entry["figures"] = figures
if status != "ok":
    entry["log_tail"] = open(log, errors="replace").read()[-800:] if os.path.exists(log) else ""
data["parts"][part] = entry
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
os.replace(tmp, out)
EOF
}

# part NAME SECONDS command...: runs it under `timeout`, then records it.
part() {
  local name="$1" limit="$2"; shift 2
  local log="$WORK/$name.log" t0 t1 rc status
  echo "== $name (at most ${limit} s)" >&2
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
  if [ $rc -eq 0 ] && grep -q '"status": "skipped"' "$log"; then status=skipped; fi
  record "$name" "$status" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" "$log"
  echo "   $status" >&2
}

rm -f "$OUT"
"$PY" - "$OUT" "$MODE" <<'EOF'
import json, sys, torch
out, mode = sys.argv[1:3]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
json.dump({"check": "gpu_check", "mode": mode, "device": device, "torch": torch.__version__, "parts": {}}, open(out, "w"))
EOF

# ---- the parts
if [ "$DRY" = 1 ]; then
  part pytest_gpu 120 "$PY" -m pytest -q -m gpu tests/test_precision.py
else
  part pytest_gpu 75 "$PY" -m pytest -q -m gpu
fi

cat >"$WORK/render_eval.py" <<'EOF'
import json, sys, time, torch
from data_prep.procedural import make_object
from nova3d.cameras import OrbitSpec, orbit_cameras
from nova3d.eval.mesh_render import render_mesh
dry = sys.argv[1] == "1"
size = 64 if dry else 256
cams = orbit_cameras(OrbitSpec(num_views=16, elevation_deg=0.0, radius=1.5, fov_deg=49.1, resolution=size))
mesh = make_object("mug")
test, ref = ("torch", "pytorch3d") if dry else ("nvdiffrast", "pytorch3d")
t0 = time.perf_counter(); a = render_mesh(mesh, cams, size, backend=test); t_test = time.perf_counter() - t0
t0 = time.perf_counter(); b = render_mesh(mesh, cams, size, backend=ref); t_ref = time.perf_counter() - t0
ma, mb = a.mask > 0.5, b.mask > 0.5
iou = ((ma & mb).sum() / (ma | mb).sum().clamp_min(1)).item()
both = (ma & mb).expand_as(a.rgb)
err = (a.rgb - b.rgb).abs()[both].mean().item()
print(json.dumps({"backend": test, "reference": ref, "views": 16, "size": size, "mask_iou": round(iou, 5),
                  "rgb_mean_abs_error": round(err, 5), "seconds_backend": round(t_test, 3),
                  "seconds_reference": round(t_ref, 3), "passed": iou > 0.99 and err < 0.02}))
sys.exit(0 if iou > 0.99 and err < 0.02 else 1)
EOF
part render_eval "$([ "$DRY" = 1 ] && echo 120 || echo 85)" env PYTHONPATH="$REPO" "$PY" "$WORK/render_eval.py" "$DRY"

if [ "$DRY" = 1 ]; then
  part gta_step 240 "$PY" bench/gta_step.py --gpu --quick --device cpu --config tiny  # the GPU path on CPU
else
  part gta_step 95 "$PY" bench/gta_step.py --gpu --quick
fi

cat >"$WORK/train_steps.py" <<'EOF'
"""A few real training steps of gta_full (random SVD-xt weights) through MultiViewDiffusion."""
import json, math, sys, time, torch
from nova3d.config import load_experiment
from nova3d.data.views import MultiViewBatch
from nova3d.systems.mv_diffusion import MultiViewDiffusion
dry = sys.argv[1] == "1"
predicted = 33.13  # bench/memory_ladder.py: 512² x 16 views, full checkpointing, GTA, bf16-mixed (GiB)
res, views, arch = (32, 4, "tiny") if dry else (512, 16, "svd_xt")
device = "cpu" if dry else "cuda"
cfg = load_experiment("gta_full", ["model.pretrained=null", f"model.architecture={arch}", f"data.resolution={res}",
                                   f"data.num_views={views}", "model.gradient_checkpointing=true"])
t0 = time.perf_counter()
with torch.device(device):  # random weights drawn on the GPU: seconds, not a minute of CPU init
    system = MultiViewDiffusion(cfg).to(device).train()
build_s = time.perf_counter() - t0
optimizer = system.configure_optimizers()["optimizer"]
g = torch.Generator(device=device).manual_seed(0)
def rand(*shape):
    return torch.rand(*shape, generator=g, device=device)
batch = MultiViewBatch(object_ids=["random"], input_image=rand(1, 3, res, res), rgb=rand(1, views, 3, res, res),
                       normals=rand(1, views, 3, res, res) * 2 - 1, masks=torch.ones(1, views, 1, res, res, device=device),
                       c2w=torch.eye(4, device=device).repeat(1, views, 1, 1), K=torch.eye(3, device=device).repeat(1, views, 1, 1),
                       azimuth_deg=torch.zeros(1, views, device=device), elevation_deg=torch.zeros(1, views, device=device),
                       view_indices=torch.arange(views, device=device)[None], background=torch.ones(1, 3, device=device))
autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not dry)
losses, times = [], []
if not dry:
    torch.cuda.reset_peak_memory_stats()
for step in range(3):
    t = time.perf_counter()
    with autocast:
        loss = system.compute_losses(batch, g)[0].total
    loss.backward()
    torch.nn.utils.clip_grad_norm_(system.unet.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not dry:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
    losses.append(loss.item())
peak = torch.cuda.max_memory_allocated() / 2**30 if not dry else None
ok = all(math.isfinite(v) for v in losses)
print(json.dumps({"experiment": "gta_full", "architecture": arch, "resolution": res, "views": views,
                  "losses": losses, "loss_finite": ok, "step_seconds": [round(x, 3) for x in times],
                  "build_seconds": round(build_s, 1), "peak_gib": None if peak is None else round(peak, 2),
                  "predicted_peak_gib": None if dry else predicted,
                  "measured_over_predicted": None if peak is None else round(peak / predicted, 3)}))
sys.exit(0 if ok else 1)
EOF
part train_steps "$([ "$DRY" = 1 ] && echo 240 || echo 115)" env PYTHONPATH="$REPO" "$PY" "$WORK/train_steps.py" "$DRY"

if [ "$DRY" = 1 ]; then
  # The dry run fuses the object the blender part would render, at toy size: render first, then fuse.
  part blender 240 "$PY" -m data_prep.render_views --procedural mug --out "$WORK/renders" --resolution 32 \
    --samples 2 --no-denoise --device cpu
  cat >"$WORK/fuse_small.py" <<'EOF'
import json, sys, time
from pathlib import Path
from nova3d.fuse import fuse_object, load_fusion_config
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
result = fuse_object(folder, out, load_fusion_config("fusion/default", [
    "device=cpu", "logging.progress=false", "optim.steps=20", "optim.fit_resolution=32", "export.resolution=64",
    "render.occupancy.resolution=32", "logging.turntable_frames=8", "logging.preview_every_n_steps=0"]))
print(json.dumps({"benchmark": "fusion_small", "device": "cpu", "steps": 20,
                  "seconds_total": round(time.perf_counter() - t0, 1), "faces": result.metrics.get("faces")}))
EOF
  part fusion 300 env PYTHONPATH="$REPO" "$PY" "$WORK/fuse_small.py" "$WORK/renders/mug" "$WORK/fused"
else
  part fusion 70 "$PY" bench/fusion_speed.py --device cuda --quick --out "$WORK/fusion_speed"
  part blender 30 "$PY" -m data_prep.render_views --procedural mug --out "$WORK/renders" --resolution 256 --device gpu
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
data["ok"] = all(p["status"] in ("ok", "skipped") for p in data["parts"].values())
json.dump(data, open(sys.argv[1], "w"), indent=1)
print(json.dumps(data))
sys.exit(0 if data["ok"] else 1)
EOF
