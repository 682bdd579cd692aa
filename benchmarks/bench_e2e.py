"""End-to-end benchmark: whole processes, same files, interleaved repeats.

``convt3d run`` against the script a user would write today (nibabel load ->
``torch.nn.functional.conv_transpose3d`` -> nibabel save) on a 160^3 int16
``.nii.gz`` upsampled x2 (k4 s2 p1, one channel, fixed seeded weights in an
npz) to ``.nii.gz``. Reports wall time and peak resident memory (max RSS of
the process, from ``wait4``), checks that both outputs hold the same values
(allclose 1e-5) and affine, then times the 1 GiB streaming case (320^3
float32 -> 639^3, k3 s2 p1, ``--max-memory 256M``) to ``.nii`` and ``.h5``.

    python benchmarks/bench_e2e.py [--size 160] [--repeats 3] [--no-big] [--keep DIR]

Targets: convt3d at least 5x faster than the torch script and at most 0.6x its
peak memory; the streaming runs below 640 MiB resident. Times are medians of
the repeats (the best is shown beside them); the first lines name the CPU, its
vector features, the usable cores and the gzip workers ``.nii.gz`` output uses.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

TORCH_SCRIPT = '''
import sys
import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

src, dst, weights = sys.argv[1:4]
img = nib.load(src)
x = torch.from_numpy(np.asarray(img.get_fdata(dtype=np.float32)))[None, None]
w = np.load(weights)
y = F.conv_transpose3d(x, torch.from_numpy(w["weight"]), torch.from_numpy(w["bias"]), stride=2, padding=1)
out = y[0, 0].numpy()
affine = img.affine.copy()
# The output grid: zooms / 2, origin moved by (p - (k - 1) / 2) / s voxels (what convt3d writes).
t = np.eye(4)
t[:3, :3] = np.diag([0.5] * 3)
t[:3, 3] = (1 - 1.5) / 2
nib.save(nib.Nifti1Image(out, affine @ t), dst)
'''


def _run(cmd, cwd):
    """Run a process; return (seconds, max RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return seconds, usage.ru_maxrss * 1024


def _convt3d():
    return [sys.executable, "-m", "convt3d_cli"]


def _fmt_mib(nbytes):
    return f"{nbytes / 2**20:8.0f} MiB"


def cpu_line():
    """``model name`` and the vector features from /proc/cpuinfo, the usable cores, the gzip workers."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
    features = " ".join(f for f in wanted if f in flags) or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        workers = _helper("gzip_workers")
    except subprocess.CalledProcessError:
        workers = "?"
    return f"CPU: {model}; {features}; {cores} usable cores; gzip workers: {workers}"


def gzip_workers():
    from convt3d_cli.io import _gzip

    if not hasattr(_gzip, "worker_count"):
        return "none (compressed in the main thread)"
    return (f"{_gzip.worker_count()} threads, {_gzip.MEMBER_BYTES >> 20} MiB members "
            f"({'ISA-L' if _gzip.HAVE_ISAL else 'zlib'})")


def make_inputs(folder, size):
    import nibabel as nib

    size = int(size)
    rng = np.random.default_rng(2024)
    # A smooth phantom with noise, as int16 like a scanner would store it.
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    r = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    vol = (1000 * np.exp(-3 * r ** 2) + rng.normal(0, 20, (size,) * 3)).astype(np.int16)
    affine = np.array([[1.2, 0, 0, -90], [0, 1.2, 0, -110], [0, 0, 1.5, -70], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), os.path.join(folder, "in.nii.gz"))
    weight = rng.uniform(-0.2, 0.2, (1, 1, 4, 4, 4)).astype(np.float32)
    np.savez(os.path.join(folder, "w.npz"), weight=weight, bias=np.array([0.5], np.float32))
    with open(os.path.join(folder, "torch_upsample.py"), "w") as handle:
        handle.write(TORCH_SCRIPT)


def compare(folder):
    import nibabel as nib

    a = nib.load(os.path.join(folder, "convt3d.nii.gz"))
    b = nib.load(os.path.join(folder, "torch.nii.gz"))
    same_values = np.allclose(a.get_fdata(dtype=np.float32), b.get_fdata(dtype=np.float32),
                              rtol=1e-5, atol=1e-5 * float(np.abs(b.get_fdata(dtype=np.float32)).max()))
    same_affine = np.allclose(a.affine, b.affine, atol=1e-6)
    return same_values, same_affine


def bench_small(folder, repeats, have_torch):
    convt3d = _convt3d() + ["run", "in.nii.gz", "convt3d.nii.gz", "--weights", "w.npz",
                            "--stride", "2", "--padding", "1", "-q", "--overwrite"]
    torch_cmd = [sys.executable, "torch_upsample.py", "in.nii.gz", "torch.nii.gz", "w.npz"]
    _run(convt3d, folder)  # warm the Numba cache and the page cache
    rows = {"convt3d run": [], "nibabel + torch": []}
    for _ in range(repeats):
        rows["convt3d run"].append(_run(convt3d, folder))
        if have_torch:
            rows["nibabel + torch"].append(_run(torch_cmd, folder))
    return {k: v for k, v in rows.items() if v}


def make_big(folder):
    import nibabel as nib

    rng = np.random.default_rng(0)
    path = os.path.join(folder, "big.nii")
    if not os.path.exists(path):
        nib.save(nib.Nifti1Image(rng.normal(size=(320,) * 3).astype(np.float32), np.eye(4)), path)
        np.savez(os.path.join(folder, "w3.npz"), weight=rng.normal(size=(1, 1, 3, 3, 3)).astype(np.float32))


def _helper(name, *args):
    """Run a data-heavy step in a child process.

    A child's ru_maxrss starts from its parent's resident size at fork, so this
    process stays small (no volumes, no nibabel) to keep the measurements honest.
    """
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_e2e as b; print(b.{name}(*sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *[str(a) for a in args]], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def bench_big(folder):
    _helper("make_big", folder)
    rows = {}
    for out in ("big_out.nii", "big_out.h5", "big_out.nii.gz"):
        cmd = _convt3d() + ["run", "big.nii", out, "--weights", "w3.npz", "--stride", "2", "--padding", "1",
                            "--max-memory", "256M", "-q", "--overwrite"]
        rows[f"320^3 -> 639^3 {out[8:]} (256M)"] = [_run(cmd, folder)]
        os.unlink(os.path.join(folder, out))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-big", action="store_true", help="skip the 1 GiB streaming case")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch is not installed: the nibabel + torch script is skipped")
    folder = args.keep or tempfile.mkdtemp(prefix="convt3d-bench-")
    os.makedirs(folder, exist_ok=True)
    try:
        _helper("make_inputs", folder, args.size)
        print(cpu_line())
        rows = bench_small(folder, args.repeats, have_torch)
        print(f"\n{args.size}^3 int16 .nii.gz -> x2 (k4 s2 p1) .nii.gz, {args.repeats} interleaved repeats")
        print(f"{'':24s} {'median s':>8s} {'best s':>8s} {'max RSS':>12s}")
        median = {}
        for name, results in rows.items():
            seconds = statistics.median(r[0] for r in results)
            rss = max(r[1] for r in results)
            median[name] = (seconds, rss)
            print(f"{name:24s} {seconds:8.2f} {min(r[0] for r in results):8.2f} {_fmt_mib(rss):>12s}")
        if have_torch:
            (ts, tr), (cs, cr) = median["nibabel + torch"], median["convt3d run"]
            values, affine = _helper("compare", folder).strip("()").split(", ")
            print(f"speed-up {ts / cs:.1f}x (medians, target >= 5), memory {cr / tr:.2f}x (target <= 0.6), "
                  f"same values: {values}, same affine: {affine}")
        if not args.no_big:
            print("\n1 GiB output, streamed")
            for name, results in bench_big(folder).items():
                seconds, rss = results[0]
                print(f"{name:34s} {seconds:8.2f} s {_fmt_mib(rss):>12s}  (target < 640 MiB)")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
