# Copyright (c) the SACB-Net MONAI bundle authors.
# Licensed under the Apache License, Version 2.0 (the "License"); see the LICENSE file at the repository root.
"""
Wall time, CPU time and peak memory of ``register`` on a CT-sized pair (default 512 x 512 x 400 voxels).

The pair is synthetic but made from a real scan: the abdominal CT of ``/work/shared/data/abdomen_ct_mr_totalseg``
(122 x 101 x 30 at 3 mm) resampled onto ``--shape`` so that its field of view fills the grid (fixed image), and the
same scan sampled through a known smooth deformation (moving image: a translation plus sine waves of a few mm). Its
TotalSegmentator labels go along (nearest), so ``metrics.json`` shows whether the run still registers.

The grid's voxel size is ``--spacing_mm``, by default 0.75 x 0.75 x 1.0 mm, what a 512 x 512 x 400 chest-abdomen CT
has: the scan is stretched to fill that grid (4.4x along its 90 mm axis), so the foreground fills the field of view as
in a real CT and the network and refinement grids, which ``register`` picks from the voxel size (isotropic in mm),
have the size they would have on a real CT. ``--spacing_mm fov`` keeps the scan's own field of view instead (the
rows measured before 2026-12-07 17:00; at 512 x 512 x 400 that is 0.72 x 0.59 x 0.23 mm, and the isotropic network
grid at 0.44 mm is then ~9x the size of a real CT's).

``register`` runs with default settings plus the CT flags (``--intensity_window=-1000,1000 --background=-1024``,
the documented CT handling) in a child process started from this small parent, through a tiny launcher that

- samples its own ``VmRSS`` (``/proc/self/status``) every ``--sample_s`` seconds in a thread and, at each new peak,
  records the main thread's innermost bundle frames, so the log says *where* the peak happens;
- writes its ``VmHWM`` (peak resident set, reset by ``exec``, so not inherited from this parent) at exit.

Wall time is measured around the child, CPU time is its user + system time (``RUSAGE_CHILDREN`` delta). The data are
built by a separate child first, so this parent stays small. On a shared machine, compare CPU time and peak RSS; the
wall time is only indicative.

Usage::

    nice -n 10 python bench/large_volume.py --work /tmp/large_volume --out bench/results/large_volume.json
    python bench/large_volume.py --shape 96,96,64 --work /tmp/lv_small --out /tmp/lv_small.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
SOURCE_DIR = REPO_ROOT.parent / "shared" / "data" / "abdomen_ct_mr_totalseg"
CT_FLAGS = ["--intensity_window=-1000,1000", "--background=-1024"]

# The launcher runs ``scripts.cli`` in the measured process; kept as source so the child imports nothing of ours first.
LAUNCHER = r"""
import atexit, json, os, runpy, sys, threading, time, traceback
log_path, sample_s = sys.argv[1], float(sys.argv[2])
sys.argv = ["scripts.cli"] + sys.argv[3:]
main_thread, start = threading.main_thread(), time.monotonic()
samples, peaks = [], []

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MB

def where():
    frame = sys._current_frames().get(main_thread.ident)
    stack = traceback.extract_stack(frame) if frame is not None else []
    ours = [f"{s.filename.split('/scripts/')[-1]}:{s.lineno} {s.name}" for s in stack if "/scripts/" in s.filename]
    return ours[-4:] or [f"{s.filename}:{s.lineno} {s.name}" for s in stack[-2:]]

def sample():
    peak = 0.0
    while True:
        rss = status("VmRSS")
        t = round(time.monotonic() - start, 2)
        samples.append((t, round(rss)))
        if rss > peak + 64:  # a new peak, 64 MB above the last one recorded
            peak = rss
            peaks.append({"t": t, "rss_mb": round(rss), "where": where()})
            report()  # kept up to date: a run killed for memory still leaves its peaks
        time.sleep(sample_s)

def report():
    kept = samples[::max(1, len(samples) // 400)]
    with open(log_path + ".tmp", "w") as f:
        json.dump({"vm_hwm_mb": status("VmHWM"), "peaks": list(peaks), "samples": kept}, f)
    os.replace(log_path + ".tmp", log_path)

atexit.register(report)
threading.Thread(target=sample, daemon=True).start()
runpy.run_module("scripts.cli", run_name="__main__")
"""


def make_pair(
    work: Path, shape: tuple[int, int, int], amplitude_mm: float, source_dir: Path = SOURCE_DIR,
    spacing_mm: tuple[float, float, float] | None = (0.75, 0.75, 1.0),
) -> dict:
    """Write fixed/moving CT and labels of spatial ``shape`` and voxel size ``spacing_mm`` (None: the source's field of
    view over ``shape``) into ``work``; returns their paths and grid."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    ct = nib.load(str(source_dir / "ct_img.nii.gz"))
    seg = nib.load(str(source_dir / "ct_seg_total.nii.gz"))
    small = np.asarray(ct.get_fdata(dtype=np.float32))
    labels = np.asarray(seg.dataobj).astype(np.float32)
    src_shape = np.array(small.shape)
    # same field of view (first and last voxel centres kept), finer voxels
    step = (src_shape - 1) / (np.array(shape) - 1)  # source voxels per grid voxel: the source fills the grid
    source_spacing = np.linalg.norm(ct.affine[:3, :3], axis=0)
    spacing_mm = source_spacing * step if spacing_mm is None else np.array(spacing_mm, dtype=np.float64)
    affine = ct.affine.copy()
    affine[:3, :3] = ct.affine[:3, :3] / source_spacing[None, :] * spacing_mm[None, :]
    volumes = {name: torch.from_numpy(a)[None, None] for name, a in (("image", small), ("label", labels))}
    out = {name: np.empty(shape, dtype=np.int16 if name.endswith("image") else np.uint8)
           for name in ("fixed_image", "fixed_label", "moving_image", "moving_label")}
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    slab = 16
    for z0 in range(0, shape[2], slab):  # slab-wise, so building the pair needs little memory
        zs = axes[2][z0 : z0 + slab]
        i, j, k = torch.meshgrid(axes[0], axes[1], zs, indexing="ij")
        # the known deformation, in mm: translation + one sine wave per axis (period a third of the extent)
        wave = [torch.sin(2 * np.pi * c / (n / 3.0)) for c, n in zip((j, k, i), (shape[1], shape[2], shape[0]))]
        shift_mm = [amplitude_mm * (0.5 + w) for w in wave]
        for moved, prefix in ((False, "fixed"), (True, "moving")):
            coords = [c * s for c, s in zip((i, j, k), step)]  # source voxel indices
            if moved:
                # mm on the grid -> grid voxels -> source voxels
                coords = [c + d / sp * st for c, d, sp, st in zip(coords, shift_mm, spacing_mm, step)]
            grid = torch.stack([2 * c / (n - 1) - 1 for c, n in zip(coords, src_shape)][::-1], dim=-1)[None]
            for name, mode in (("image", "bilinear"), ("label", "nearest")):
                pad = -1024.0 if name == "image" else 0.0
                sampled = F.grid_sample(volumes[name] - pad, grid, mode=mode, padding_mode="zeros",
                                        align_corners=True)[0, 0] + pad
                out[f"{prefix}_{name}"][:, :, z0 : z0 + slab] = np.round(sampled.numpy())
    paths = {}
    for name, array in out.items():
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        paths[name] = str(work / f"{name}.nii.gz")
        nib.save(image, paths[name])
    return {"paths": paths, "shape": list(shape), "spacing_mm": [round(float(s), 4) for s in spacing_mm],
            "deformation": f"translation {amplitude_mm / 2} mm + sine waves of amplitude {amplitude_mm} mm per axis"}


def run_register(pair: dict, out_dir: Path, log_path: Path, extra: list[str], sample_s: float) -> dict:
    """Run ``register`` in a fresh child; wall, CPU and peak RSS of that child."""
    p = pair["paths"]
    args = ["register", f"--fixed={p['fixed_image']}", f"--moving={p['moving_image']}",
            f"--fixed_label={p['fixed_label']}", f"--moving_label={p['moving_label']}", f"--out={out_dir}",
            "--overwrite=True", "--device=cpu", *CT_FLAGS, *extra]
    command = [sys.executable, "-c", LAUNCHER, str(log_path), str(sample_s), *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    completed = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"register failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    log = json.loads(log_path.read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(["python -m scripts.cli", *args]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mb": round(log["vm_hwm_mb"]), "peaks": log["peaks"], "rss_samples": log["samples"],
            "metrics": {k: metrics[k] for k in metrics if not isinstance(metrics[k], (dict, list))}}


def _own_status_mb(field: str) -> float:
    """``field`` (e.g. ``VmRSS``, ``VmHWM``) of this process's ``/proc/self/status``, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith(field + ":"))


def _synthetic_outputs(shape: tuple[int, int, int]):
    """Seeded synthetic data of spatial ``shape`` for the in-process measurements: the grid's (4, 4) affine (0.7 x 0.6
    x 0.25 mm), a smooth (3, X, Y, Z) displacement of a few voxels and a (1, X, Y, Z) image in [0, 1)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    affine = torch.diag(torch.tensor([0.7, 0.6, 0.25, 1.0], dtype=torch.float64))
    field = F.interpolate(torch.randn(1, 3, 6, 6, 5, generator=generator) * 3, size=shape, mode="trilinear")[0]
    image = torch.rand((1, *shape), generator=generator)
    return affine, field, image


def postprocessing_peak(shape: tuple[int, int, int]) -> dict:
    """Peak RSS of the full-resolution post-processing alone (``WarpByDdfd``, ``JacobianDeterminantd``,
    ``WarpFromSourced`` as ``inference.json`` chains them), on synthetic data of ``shape``, in this process (run it in a
    fresh child): RSS after the inputs exist, and ``VmHWM`` after the transforms."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    import torch
    from monai.data import MetaTensor

    from scripts.layers import Warp
    from scripts.workflow import JacobianDeterminantd, WarpByDdfd, WarpFromSourced

    status = _own_status_mb
    affine, field, image = _synthetic_outputs(shape)
    label = (image * 5).to(torch.uint8)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, 3] = torch.tensor([1.5, -2.0, 0.5])
    data = {"pred": MetaTensor(field, affine=affine), "moving_image": MetaTensor(image, affine=affine),
            "fixed_image": MetaTensor(image.clone(), affine=affine), "moving_source": MetaTensor(image, affine=affine),
            "moving_label_source": MetaTensor(label, affine=affine), "affine_matrix": matrix}
    baseline = status("VmRSS")
    data = WarpByDdfd(["moving_image"], Warp(), output_keys=["warped_moving_scaled"])(data)
    data = JacobianDeterminantd("pred")(data)
    data = WarpFromSourced(["moving_source", "moving_label_source"], ["warped_image", "warped_label"],
                           mode=["bilinear", "nearest"])(data)
    return {"shape": list(shape), "rss_with_inputs_mb": round(baseline), "peak_rss_mb": round(status("VmHWM"))}


def writers_peak(shape: tuple[int, int, int], work: Path) -> dict:
    """Peak RSS of writing one pair's files (``SaveTransformsd`` then ``SaveRegistrationOutputsd``, as
    ``inference.json`` chains them, default workers) on synthetic outputs of ``shape``, in this process (run it in a
    fresh child): RSS after the outputs exist, ``VmHWM`` after the files are written, and the CPU seconds of writing."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    import torch
    from monai.data import MetaTensor

    from scripts.io import SaveRegistrationOutputsd
    from scripts.workflow import SaveTransformsd

    status = _own_status_mb
    affine, field, image = _synthetic_outputs(shape)
    data = {"pred": MetaTensor(field, affine=affine), "fixed_image": MetaTensor(image, affine=affine),
            "warped_image": MetaTensor(image, affine=affine), "jacobian_det": MetaTensor(image + 0.5, affine=affine),
            "warped_label": MetaTensor((image * 5).to(torch.uint8), affine=affine),
            "affine_matrix": torch.eye(4, dtype=torch.float64)}
    baseline, start = status("VmRSS"), time.process_time()
    data = SaveTransformsd(work, overwrite=True)(data)
    SaveRegistrationOutputsd(work, overwrite=True)(data)
    return {"shape": list(shape), "rss_with_inputs_mb": round(baseline), "peak_rss_mb": round(status("VmHWM")),
            "write_cpu_s": round(time.process_time() - start, 1)}


def _reset_peak() -> None:
    """Set this process's ``VmHWM`` back to its current RSS (Linux >= 4.0), so a stage's peak excludes its inputs'
    construction."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def qc_and_metrics_peak(shape: tuple[int, int, int], work: Path) -> dict:
    """Peak RSS of the QC figure (``save_qc_png``, as ``SaveQCFigured`` calls it) and of the metrics
    (``registration_metrics``: Dice after / before, % det J <= 0, as ``RegistrationMetricsd``) alone, each above the
    RSS with its inputs in memory, on synthetic data of ``shape`` (label maps of 80 ids, uint8), in this process (run
    it in a fresh child); also the metrics' values, which must not depend on how they are counted."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    import torch
    from monai.data import MetaTensor

    from scripts.workflow.metrics import registration_metrics
    from scripts.workflow.qc import save_qc_png

    status = _own_status_mb
    affine, field, image = _synthetic_outputs(shape)
    det = 1.0 + 0.5 * field[:1]
    result = {"shape": list(shape)}
    moving, warped = image[0].flip(0), image[0].flip(1)
    _reset_peak()
    baseline, start = status("VmRSS"), time.process_time()
    save_qc_png(work / "qc.png", image[0], moving, warped, field, det[0], title="synthetic")
    result["qc"] = {"peak_above_inputs_mb": round(status("VmHWM") - baseline),
                    "cpu_s": round(time.process_time() - start, 1)}
    labels = [MetaTensor((field[:1] * 8 + 40).clamp(0, 79).to(torch.uint8).roll(shift, 1), affine=affine)
              for shift in (0, 2, 5)]
    del image, moving, warped
    _reset_peak()
    baseline, start = status("VmRSS"), time.process_time()
    metrics = registration_metrics(labels[0], labels[1], labels[2], jacobian_det=det)
    result["metrics"] = {"peak_above_inputs_mb": round(status("VmHWM") - baseline),
                         "cpu_s": round(time.process_time() - start, 1),
                         **{k: metrics[k] for k in ("mean_dice", "mean_dice_identity",
                                                    "percent_non_positive_jacobian")}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512,512,400", help="spatial size X,Y,Z of the pair")
    parser.add_argument("--work", type=Path, required=True, help="folder for the pair and the outputs (not the repo)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    parser.add_argument("--amplitude_mm", type=float, default=4.0, help="amplitude of the synthetic deformation")
    parser.add_argument("--spacing_mm", default="0.75,0.75,1.0",
                        help="voxel size X,Y,Z of the pair, or 'fov' for the source scan's field of view over --shape")
    parser.add_argument("--sample_s", type=float, default=0.25, help="RSS sampling period of the launcher")
    parser.add_argument("--source_dir", type=Path, default=SOURCE_DIR, help="folder of ct_img / ct_seg_total.nii.gz")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. 'before')")
    parser.add_argument("--make_only", action="store_true", help=argparse.SUPPRESS)  # the data-building child
    parser.add_argument("--postprocessing_only", action="store_true",
                        help="measure the full-resolution post-processing transforms alone on synthetic data")
    parser.add_argument("--writers_only", action="store_true",
                        help="measure writing one pair's files alone (transform files, then the NIfTI outputs)")
    parser.add_argument("--qc_metrics_only", action="store_true",
                        help="measure the QC figure and the metrics alone (each above its inputs) on synthetic data")
    parser.add_argument("register_flags", nargs="*",
                        help="extra register flags after --, e.g. -- --refine_iterations=0")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3 or min(shape) < 2:
        raise SystemExit(f"--shape must be three sizes >= 2 like 512,512,400, got {args.shape!r}.")
    spacing = None if args.spacing_mm == "fov" else tuple(float(s) for s in args.spacing_mm.split(","))
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise SystemExit(f"--spacing_mm must be three sizes > 0 like 0.75,0.75,1.0 or 'fov', got {args.spacing_mm!r}.")
    if args.postprocessing_only or args.writers_only or args.qc_metrics_only:  # this parent starts the measured child
        work = f"{shape!r}, m['Path']({str(args.work)!r})"
        name, arguments = (("postprocessing_peak", repr(shape)) if args.postprocessing_only
                           else ("writers_peak", work) if args.writers_only else ("qc_and_metrics_peak", work))
        args.work.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", f"import runpy, sys; sys.argv = ['x']; m = runpy.run_path({str(__file__)!r}); "
                   f"print(m['json'].dumps(m[{name!r}]({arguments})))"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(output) | {"cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime
                                                       - before.ru_stime, 1), "label": args.label}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return
    pair_file = args.work / f"pair_{'x'.join(map(str, shape))}_{args.spacing_mm.replace(',', 'x')}.json"
    if args.make_only:
        args.work.mkdir(parents=True, exist_ok=True)
        pair_file.write_text(json.dumps(make_pair(args.work, shape, args.amplitude_mm, args.source_dir, spacing)))
        return
    if not args.source_dir.is_dir():
        raise SystemExit(f"the source scan folder {args.source_dir} is missing (needs /work/shared/data).")
    if not pair_file.is_file():  # built in its own child, so this process stays small
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--work", str(args.work), "--amplitude_mm",
                        str(args.amplitude_mm), "--source_dir", str(args.source_dir), "--spacing_mm", args.spacing_mm,
                        "--out", str(args.out), "--make_only"], check=True)
    pair = json.loads(pair_file.read_text())
    result = run_register(pair, args.work / "out", args.work / "rss_log.json", args.register_flags, args.sample_s)
    import torch  # only for the version, after the measured run

    result.update({
        "label": args.label, "shape": pair["shape"], "spacing_mm": pair["spacing_mm"],
        "deformation": pair["deformation"], "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at end", "torch": torch.__version__,
        "python": platform.python_version(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("shape", "wall_s", "cpu_s", "peak_rss_mb", "metrics")}, indent=1))
    for peak in result["peaks"][-5:]:
        print(peak)


if __name__ == "__main__":
    main()
