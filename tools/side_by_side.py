"""prism beside PyTorch on the same machine: one client trains the same network on the same loss
for the same number of steps, once in prism (`prism train --clients 1 --partition iid --rounds 1
--no-mada`) and once in tools/replica.py (PyTorch eager on the CPU), one after the other, and the
ratio of their times is printed (issue 14's side-by-side goal: prism no slower than PyTorch).

    python3 tools/side_by_side.py --data ../shared/data                 # mlp28-up, 1000 steps
    python3 tools/side_by_side.py --data ../shared/data --net resnet32 --steps 20
    python3 tools/side_by_side.py --install-torch ...    # PyTorch into tools/.venv first

Both are timed as a user sees them (the process from start to end: data loading, set-up, the
steps, writing samples) and by their own count of the training loop (prism's "time: local steps",
the replica's "training loop: S s"). The machine's speed drifts, so --repeat N alternates the two
N times and reports the median ratio. This script needs only Python's standard library; the
replica needs PyTorch, numpy and pillow in the interpreter given by --python (default: this one,
or tools/.venv when it exists). --install-torch creates that venv and installs them with pip;
nothing is installed unless asked.
"""
import argparse, os, re, shutil, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv")

# The two sides of each network: prism's flags and the replica's, for the same configuration.
NETS = {
    "mlp28-up": dict(batch=128, prism=["--arch", "mlp28-up"], replica=["--side", "14"]),
    "resnet32": dict(batch=64, prism=["--arch", "resnet32"], replica=["--arch", "resnet32"]),
}


def venv_python():
    return os.path.join(VENV, "Scripts" if os.name == "nt" else "bin", "python")


def install_torch():
    if not os.path.exists(venv_python()):
        print(f"creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    print("installing torch, numpy and pillow into it with pip", flush=True)
    subprocess.run([venv_python(), "-m", "pip", "install", "torch", "numpy", "pillow"], check=True)


def has_torch(python):
    probe = "import torch, numpy, PIL; print(torch.__version__)"
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def timed(cmd, log):
    """Runs cmd, its output to log; returns (wall seconds, the output)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t
    text = open(log).read()
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n--- last output ---\n{text[-3000:]}")
    return wall, text


def loop_seconds(pattern, text):
    m = re.findall(pattern, text)
    return float(m[-1]) if m else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("PRISM_DATA", "data"),
                    help="folder holding mnist/ with MNIST's IDX files (default $PRISM_DATA, ./data)")
    ap.add_argument("--net", default="mlp28-up", choices=sorted(NETS))
    ap.add_argument("--steps", type=int, default=1000, help="local steps of the one client")
    ap.add_argument("--batch", type=int, default=0, help="default 128 (mlp28-up), 64 (resnet32)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate prism and PyTorch N times")
    ap.add_argument("--prism", default=None,
                    help="prism binary (default: build target/release/prism with cargo)")
    ap.add_argument("--python", default=None, help="interpreter for tools/replica.py")
    ap.add_argument("--install-torch", action="store_true",
                    help=f"create {os.path.relpath(VENV, ROOT)} and pip-install torch, numpy, pillow")
    ap.add_argument("--keep", default=None, help="keep the two runs' outputs in this folder")
    a = ap.parse_args()
    net = NETS[a.net]
    batch = a.batch or net["batch"]
    mnist = os.path.join(a.data, "mnist")
    if not os.path.exists(os.path.join(mnist, "train-images-idx3-ubyte.gz")):
        sys.exit(f"no MNIST in {mnist} (train-images-idx3-ubyte.gz): pass --data or set PRISM_DATA")

    if a.install_torch:
        install_torch()
    python = a.python or (venv_python() if os.path.exists(venv_python()) else sys.executable)
    torch_version = has_torch(python)
    if torch_version is None:
        sys.exit(f"{python} cannot import torch, numpy and PIL: pass --python, or rerun with "
                 "--install-torch to install them into a venv under tools/")

    prism = a.prism
    if prism is None:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "prism"],
                       check=True, cwd=ROOT)
        prism = os.path.join(ROOT, "target", "release", "prism")

    work = a.keep or tempfile.mkdtemp(prefix="side_by_side.")
    os.makedirs(work, exist_ok=True)
    prism_cmd = [prism, "train", "--data", a.data, *net["prism"], "--clients", "1",
                 "--partition", "iid", "--rounds", "1", "--local-steps", str(a.steps),
                 "--batch", str(batch), "--real-batch", str(batch), "--no-mada", "--no-fetch",
                 "--out", os.path.join(work, "prism")]
    replica_cmd = [python, os.path.join(HERE, "replica.py"), "--data", mnist, *net["replica"],
                   "--steps", str(a.steps), "--batch", str(batch),
                   "--out", os.path.join(work, "replica")]
    print(f"{a.net}, batch {batch}, {a.steps} steps, one client; PyTorch {torch_version} "
          f"({python}); outputs in {work}", flush=True)
    print("  prism:  ", " ".join(prism_cmd))
    print("  PyTorch:", " ".join(replica_cmd), flush=True)

    rows = []
    for i in range(a.repeat):
        pw, pt = timed(prism_cmd, os.path.join(work, "prism.log"))
        rw, rt = timed(replica_cmd, os.path.join(work, "replica.log"))
        row = (pw, loop_seconds(r"time: local steps ([0-9.]+) s", pt),
               rw, loop_seconds(r"training loop: ([0-9.]+) s", rt))
        rows.append(row)
        print(f"  try {i + 1}: prism {row[0]:.1f} s ({row[1]:.1f} s of steps), "
              f"PyTorch {row[2]:.1f} s ({row[3]:.1f} s of steps), ratio {row[0] / row[2]:.2f}",
              flush=True)

    print()
    print(f"| {time.strftime('%Y-%m-%d')} | prism | PyTorch {torch_version} | prism / PyTorch |")
    print("|---|---|---|---|")
    for i, (pw, ps, rw, rs) in enumerate(rows):
        print(f"| try {i + 1}, whole run | {pw:.1f} s | {rw:.1f} s | {pw / rw:.2f} |")
        print(f"| try {i + 1}, training loop | {ps:.1f} s | {rs:.1f} s | {ps / rs:.2f} |")
    ratio = statistics.median(pw / rw for pw, _, rw, _ in rows)
    print(f"\nmedian ratio of whole runs: {ratio:.2f} "
          f"({'prism faster' if ratio < 1 else 'PyTorch faster'})")
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
