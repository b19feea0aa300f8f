#!/usr/bin/env python3
"""Check that the GPU set (requirements-gpu.txt + the project's extras) resolves, without
downloading the big wheels.

    python scripts/check_gpu_resolution.py                       # the repo's set, no report file
    python scripts/check_gpu_resolution.py --results bench/results/gpu_resolution-DATE.json
    python scripts/check_gpu_resolution.py -r other.txt --no-project

How it stays small: pip resolves with `install --dry-run --ignore-installed` (nothing is
installed) and `--use-feature=fast-deps`, which reads each wheel's METADATA with HTTP range
requests (the zip's directory and one member) instead of downloading the wheel: PyPI serves no
PEP 658 `.metadata` file for these wheels, so without it pip would fetch torch, vllm and the
CUDA libraries whole (several GB). pip runs with `--isolated` and no config files, so a local
wheel folder or index (such as this machine's +cpu torch) cannot stand in for PyPI's.

A pinned package that is a source distribution only (transformer-engine-torch) would have to be
built to learn its dependencies (its build pulls in a whole torch); instead its declared
`Requires-Dist` is read from the sdist's PKG-INFO (half a megabyte) and resolved in its place.
Its dependency on `transformer_engine_cuNN` is computed at build time from the CUDA version of
the torch it builds against, so the check also compares NN with the resolved torch's CUDA major.

Exit status: 0 resolves; 1 does not resolve (the message names the conflicting packages);
2 bad input (a line that is not `name==version`); 3 pip or the index failed otherwise.
"""
from __future__ import annotations

import argparse
import datetime as dt
import email.parser
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")
SDIST_LIMIT = 20 * 1024 * 1024  # an sdist read for its PKG-INFO must be small


class Unresolvable(Exception):
    """The set does not resolve; str() names the packages."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> list[tuple[str, str]]:
    pins = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        if not m:
            raise ValueError(f"{path}:{lineno}: '{line}' is not an exact pin (name==version)")
        pins.append((m.group(1), m.group(2)))
    return pins


def fetch(url: str, timeout: float = 60) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def release_files(json_url: str, name: str, version: str) -> list[dict]:
    try:
        data = json.loads(fetch(f"{json_url}/{name}/json"))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise Unresolvable(f"{name} is not on the index ({json_url}/{name}/json: 404)")
        raise
    files = data.get("releases", {}).get(version)
    if not files:
        raise Unresolvable(f"{name}=={version} is not on the index (no files for that version)")
    return files


def sdist_requires(url: str, size: int, name: str, version: str) -> list[str]:
    if size > SDIST_LIMIT:
        raise RuntimeError(f"{name}=={version}: the sdist is {size} bytes; refusing to read it")
    blob = fetch(url)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1
                      and m.name.endswith("/PKG-INFO"))
        meta = email.parser.Parser().parsestr(tar.extractfile(member).read().decode())
    return meta.get_all("Requires-Dist") or []


def rx_bytes() -> int | None:
    """Bytes received by every non-loopback interface (machine-wide; an upper bound)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return None
    total = 0
    for line in lines:
        iface, data = line.split(":", 1)
        if iface.strip() != "lo":
            total += int(data.split()[0])
    return total


def download_size(urls: list[str]) -> int:
    """What installing the resolved set downloads: the sum of Content-Length (HEAD requests)."""
    def head(url: str) -> int:
        if not url.startswith("http"):
            return 0
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=60) as r:
            return int(r.headers.get("Content-Length") or 0)
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(head, urls))


def conflict_message(pip_output: str) -> str | None:
    """The lines of pip's output that name what does not resolve, or None."""
    lines = pip_output.splitlines()
    for i, line in enumerate(lines):
        if "The conflict is caused by:" in line:
            cause = []
            for nxt in lines[i + 1:]:
                if not nxt.strip():
                    break
                cause.append(nxt.strip())
            return "\n".join(cause)
    found = [l.strip() for l in lines if "No matching distribution found for" in l
             or "Could not find a version that satisfies" in l]
    if found:
        return "\n".join(found)
    if "ResolutionImpossible" in pip_output:
        return "\n".join(l for l in lines if "ERROR" in l)
    return None


def cuda_major_of_torch(requires: list[str]) -> int | None:
    for req in requires:
        m = re.match(r"cuda-toolkit\b.*?==\s*(\d+)\.", req) or re.match(r"nvidia-\w+-cu(\d+)\b", req)
        if m:
            return int(m.group(1))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-r", "--requirements", type=Path, default=REPO / "requirements-gpu.txt")
    ap.add_argument("--project", type=Path, default=REPO,
                    help="resolve this project's [rl,metrics,dev] with the set (default: the repo)")
    ap.add_argument("--no-project", action="store_true", help="resolve the requirements file alone")
    ap.add_argument("--results", type=Path, help="write what was resolved, timings and bytes here")
    ap.add_argument("--index-json", default="https://pypi.org/pypi",
                    help="PyPI JSON API base, for release files and sdist PKG-INFO")
    args = ap.parse_args(argv)

    start, rx0 = time.monotonic(), rx_bytes()
    try:
        pins = read_pins(args.requirements)
    except (OSError, ValueError) as e:
        print(f"check_gpu_resolution: {e}", file=sys.stderr)
        return 2

    # 1. Each pin exists; sdist-only pins are replaced by their declared requirements.
    lines, sdists = [], {}
    try:
        for name, version in pins:
            files = release_files(args.index_json, name, version)
            wheels = [f for f in files if f["filename"].endswith(".whl")]
            if wheels:
                lines.append(f"{name}=={version}")
                continue
            sd = next(f for f in files if f["filename"].endswith((".tar.gz", ".tgz")))
            url = sd["url"]
            if not url.startswith("http"):  # a mirror may give URLs relative to the JSON
                url = "https://files.pythonhosted.org/packages/" + url.split("/packages/", 2)[-1]
            reqs = sdist_requires(url, sd["size"], name, version)
            sdists[norm(name)] = {"version": version, "requires_dist": reqs}
            lines += [r for r in reqs if "extra ==" not in r]
    except Unresolvable as e:
        print(f"check_gpu_resolution: the GPU set does not resolve: {e}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, RuntimeError, StopIteration) as e:
        print(f"check_gpu_resolution: could not read the index ({args.index_json}): {e}",
              file=sys.stderr)
        return 3

    # 2. pip resolves it all, reading wheel metadata by range requests; nothing is installed.
    with tempfile.TemporaryDirectory(prefix="gpu-resolve-") as tmp:
        reqfile, report = Path(tmp, "requirements.txt"), Path(tmp, "report.json")
        reqfile.write_text("\n".join(lines) + "\n")
        cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run",
               "--ignore-installed", "--use-feature=fast-deps", "--no-cache-dir",
               "--progress-bar", "off", "--report", str(report), "-r", str(reqfile)]
        if not args.no_project:
            cmd.append(f"{args.project.resolve()}[rl,metrics,dev]")
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            cause = conflict_message(output)
            if cause:
                print("check_gpu_resolution: the GPU set does not resolve; pip says the "
                      f"conflict is caused by:\n{cause}", file=sys.stderr)
                return 1
            print("check_gpu_resolution: pip failed (not a conflict):\n"
                  + "\n".join(output.splitlines()[-20:]), file=sys.stderr)
            return 3
        installed = json.loads(report.read_text())["install"]
        pip_version = json.loads(report.read_text())["pip_version"]

    resolved = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in installed}
    meta = {norm(i["metadata"]["name"]): i["metadata"] for i in installed}

    # 3. The pins came out as pinned, and the sdist's CUDA core matches the torch.
    problems = [f"{n}=={v} resolved as {resolved.get(norm(n), 'nothing')}"
                for n, v in pins if norm(n) not in sdists and resolved.get(norm(n)) != v]
    torch_cuda = cuda_major_of_torch(meta.get("torch", {}).get("requires_dist", []))
    for core in (n for n in resolved if re.fullmatch(r"transformer-engine-cu\d+", n)):
        if torch_cuda is not None and core != f"transformer-engine-cu{torch_cuda}":
            problems.append(f"{core} is in the set, but transformer-engine-torch built against "
                            f"torch {resolved.get('torch')} (CUDA {torch_cuda}) needs "
                            f"transformer-engine-cu{torch_cuda}")
    if problems:
        print("check_gpu_resolution: the GPU set does not resolve as pinned:\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 1

    elapsed = time.monotonic() - start
    rx1 = rx_bytes()
    received = None if rx0 is None or rx1 is None else rx1 - rx0
    install_bytes = download_size([i["download_info"]["url"] for i in installed])
    vllm_torch = [r for r in meta.get("vllm", {}).get("requires_dist", [])
                  if re.match(r"torch\s*[=<>!~(]", r)]
    summary = {
        "date": dt.date.today().isoformat(),
        "requirements": str(args.requirements.resolve().relative_to(REPO))
        if args.requirements.resolve().is_relative_to(REPO) else str(args.requirements),
        "requirements_sha256": hashlib.sha256(args.requirements.read_bytes()).hexdigest(),
        "project_extras": None if args.no_project else "[rl,metrics,dev]",
        "python": sys.version.split()[0],
        "pip": pip_version,
        "method": "pip --isolated install --dry-run --ignore-installed --use-feature=fast-deps",
        "resolves": True,
        "pins": {n: resolved.get(norm(n), "(sdist; declared deps resolved)") for n, _ in pins},
        "vllm_requires_torch": vllm_torch,
        "torch_cuda_major": torch_cuda,
        "sdist_only": sdists,
        "seconds": round(elapsed, 1),
        "bytes_received_machine_wide": received,
        "bytes_an_install_downloads": install_bytes,
        "resolved_count": len(resolved),
        "resolved": dict(sorted(resolved.items())),
    }
    print(f"check_gpu_resolution: ok: {len(resolved)} packages resolve together in "
          f"{elapsed:.0f} s"
          + (f", {received / 1e6:.0f} MB received" if received is not None else "")
          + f"; installing them downloads {install_bytes / 1e9:.2f} GB")
    for n, _ in pins:
        print(f"  {n} {summary['pins'][n]}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_name(args.results.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, args.results)
        print(f"check_gpu_resolution: wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
