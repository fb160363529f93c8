"""A real Linux kernel with kTLS under QEMU, running this machine's Python.

The kernels these machines run have no kTLS (``CONFIG_TLS`` unset), so the kTLS tests
boot Debian's generic kernel (``linux-image-<version>-amd64``, Linux 6.1 in bookworm:
``CONFIG_TLS=m``, 9p, TLS 1.3 TX and RX, no rekeying) under QEMU's TCG (``/dev/kvm``
exists here but cannot run it) and run a command with the host's root file system
mounted read-only over virtio-9p under a tmpfs overlay, so the guest's Python is the
host's venv interpreter with this checkout.

Built once into ``${XDG_CACHE_HOME:-~/.cache}/trellis/kernel-<version>/``, keyed by the
package version and a hash of the init script and module list: the package fetched
with ``apt-get download`` and unpacked with ``dpkg -x`` (never into /), ``modules.dep``
made with ``depmod -b`` (the package ships none), the uncompressed ELF ``vmlinux`` taken
out of the bzImage (the XZ stream found by its magic bytes; booting it saves about
2.5 s of decompression on an emulated CPU), and a busybox-static initramfs holding the
modules kTLS and 9p need.
A file lock makes concurrent builders wait for one build; the folder appears by an
atomic rename. Needs the Debian packages qemu-system-x86, busybox-static, cpio and kmod
(``make kernel`` installs them when run as root). ``python -m tests.kernel.guest_vm``
builds; whatever is missing is one line (``KernelUnavailable``), exit status 1.

`run(command)` boots the guest, runs ``command`` (a shell line) as root in the
checkout's directory, and returns its exit status and output (stdout and stderr
together), which come back through a second, writable 9p share. The guest's CPU is
emulated: use it to prove behaviour, never to quote speed.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
NEEDED = {
    QEMU: "qemu-system-x86",
    BUSYBOX: "busybox-static",
    "cpio": "cpio",
    "depmod": "kmod",
}
# What the guest loads, roots only: modules.dep supplies the dependencies and their
# order (virtio_ring, virtio, the virtio-pci halves; netfs and fscache under 9p; cryptd
# and crypto_simd under aesni-intel; libchacha and libpoly1305 under the ChaCha20 ones).
MODULES = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "overlay",
    "aesni-intel",
    "gf128mul",
    "ghash-generic",
    "ghash-clmulni-intel",
    "ctr",
    "gcm",
    "chacha_generic",
    "chacha-x86_64",
    "poly1305_generic",
    "poly1305-x86_64",
    "chacha20poly1305",
    "tls",
)
XZ_MAGIC = b"\xfd7zXZ\x00"
BOOT_TIMEOUT = 600.0  # imports under TCG are ~20x slower than here: a run is one to two minutes

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/modules/$m" 2>/dev/null; done
ip link set lo up
mkdir -p /lower /upper /newroot /out
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose host /lower
mount -t 9p -o trans=virtio,version=9p2000.L out /out
mount -t tmpfs -o size=900m tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
mkdir -p /newroot/run/guest-out /newroot/tmp
mount --bind /out /newroot/run/guest-out
chroot /newroot /bin/sh /run/guest-out/command.sh > /out/output 2>&1
echo $? > /out/status
sync
poweroff -f
"""


class KernelUnavailable(RuntimeError):
    """The guest cannot be built or booted here; the message is one line saying why."""


@dataclass(frozen=True, slots=True)
class GuestRun:
    status: int
    output: str


def kernel_package() -> str:
    """linux-image-<version>-amd64, the package Debian's linux-image-amd64 depends on."""
    try:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"apt-cache depends linux-image-amd64: {exc}") from None
    found = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)\b", out)
    if found is None:
        raise KernelUnavailable("apt-cache names no linux-image-<version>-amd64")
    return found.group(1)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis"


def stamp() -> str:
    """What the build depends on besides the package version: the init script and the
    module list (an edit elsewhere in this file does not fetch the kernel again)."""
    return hashlib.sha256("\0".join((INIT, *MODULES)).encode()).hexdigest()[:16]


def cached_folder() -> Path | None:
    """The newest complete build with this file's stamp, without asking apt."""
    root = cache_root()
    if not root.is_dir():
        return None
    for folder in sorted(root.glob("kernel-*"), reverse=True):
        if _complete(folder):
            return folder
    return None


def _complete(folder: Path) -> bool:
    try:
        recorded = (folder / "stamp").read_text().strip()
    except OSError:
        return False
    return recorded == stamp() and all(
        (folder / name).is_file() for name in ("vmlinux", "initramfs.cpio")
    )


def missing_tools() -> list[str]:
    return sorted(
        package
        for tool, package in NEEDED.items()
        if not (Path(tool).is_file() if tool.startswith("/") else shutil.which(tool))
    )


def _vmlinux(bzimage: Path) -> bytes:
    """The ELF kernel inside a bzImage: its payload is one XZ stream (followed by
    padding), found by the stream's magic bytes."""
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        raise KernelUnavailable(f"{bzimage.name}: no XZ payload")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = decompressor.decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise KernelUnavailable(f"{bzimage.name}: the XZ payload is not an ELF kernel")
    return elf


def _module_order(root: Path, release: str) -> list[str]:
    """Module paths (relative to lib/modules/<release>) in loading order."""
    moddir = root / "lib" / "modules" / release
    subprocess.run(["depmod", "-b", str(root), release], check=True, timeout=300)
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.removesuffix(".ko").replace("-", "_")
        by_name[name] = path
    order: list[str] = []

    def load(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):  # the last listed loads first
            load(dep)
        order.append(path)

    builtin = (moddir / "modules.builtin").read_text()
    for name in MODULES:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            if f"/{name}.ko" in builtin or f"/{name.replace('-', '_')}.ko" in builtin:
                continue
            raise KernelUnavailable(f"kernel {release} has no module {name}")
        load(path)
    return order


def _initramfs(root: Path, release: str, out: Path) -> None:
    tree = out.parent / "initramfs"
    for sub in ("bin", "proc", "sys", "dev", "modules"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    moddir = root / "lib" / "modules" / release
    names = []
    for rel in _module_order(root, release):
        name = Path(rel).name
        shutil.copy2(moddir / rel, tree / "modules" / name)
        names.append(name)
    (tree / "modules.order").write_text("\n".join(names) + "\n")
    init = tree / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with out.open("wb") as archive:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=tree,
            input="\n".join(files).encode() + b"\n",
            stdout=archive,
            check=True,
            timeout=120,
        )
    shutil.rmtree(tree)


def build(progress: bool = False) -> Path:
    """The folder holding vmlinux and initramfs.cpio (built now if missing)."""
    missing = missing_tools()
    if missing:
        raise KernelUnavailable(
            f"missing Debian packages: {' '.join(missing)} (make kernel installs them as root)"
        )
    package = kernel_package()
    release = package.removeprefix("linux-image-")
    target = cache_root() / f"kernel-{release}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".kernel-{release}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _complete(target):
            return target
        if progress:
            print(f"building a kTLS test guest from {package} into {target}", flush=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            _build_into(staging, package, release, progress)
            (staging / "stamp").write_text(stamp() + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_into(staging: Path, package: str, release: str, progress: bool) -> None:
    download = staging / "download"
    download.mkdir()
    os.chmod(staging, 0o755)
    os.chmod(download, 0o777)  # apt's _apt user writes the .deb when run as root
    if progress:
        print(f"  apt-get download {package} (about 70 MB)", flush=True)
    fetched = subprocess.run(
        ["apt-get", "download", "-q", package],
        cwd=download,
        capture_output=True,
        text=True,
        timeout=900,
    )
    debs = list(download.glob("*.deb"))
    if fetched.returncode != 0 or not debs:
        last = (fetched.stderr.strip().splitlines() or ["?"])[-1]
        raise KernelUnavailable(f"apt-get download {package} failed: {last}")
    root = staging / "root"
    subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True, timeout=600)
    if progress:
        print("  vmlinux out of the bzImage, initramfs with busybox and modules", flush=True)
    (staging / "vmlinux").write_bytes(_vmlinux(root / "boot" / f"vmlinuz-{release}"))
    _initramfs(root, release, staging / "initramfs.cpio")
    shutil.rmtree(root)
    shutil.rmtree(download)


def run(command: str, timeout: float = BOOT_TIMEOUT, folder: Path | None = None) -> GuestRun:
    """Boot the guest, run `command` (a shell line) in the checkout, power off."""
    kernel = folder or build()
    with tempfile.TemporaryDirectory(prefix="trellis-guest-") as out:
        share = Path(out)
        env = " ".join(
            f"{k}={shlex.quote(v)}"
            for k, v in (
                ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                ("HOME", "/root"),
                ("LANG", "C.UTF-8"),
                ("PYTHONDONTWRITEBYTECODE", "1"),
                ("TRELLIS_KTLS_GUEST", "1"),
            )
        )
        (share / "command.sh").write_text(
            f"cd {shlex.quote(str(REPO))} || exit 125\nexport {env}\n{command}\n"
        )
        qemu = [
            QEMU,
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "1024",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
            "-kernel",
            str(kernel / "vmlinux"),
            "-initrd",
            str(kernel / "initramfs.cpio"),
            "-append",
            "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={share},mount_tag=out,security_model=none,multidevs=remap",
        ]
        started = time.monotonic()
        try:
            console = subprocess.run(
                qemu,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            output = _read(share / "output")
            raise KernelUnavailable(
                f"the guest did not power off within {timeout:.0f}s; output so far:\n{output}"
            ) from None
        output = _read(share / "output")
        status_text = _read(share / "status").strip()
        if not status_text:
            tail = console.stdout.decode(errors="replace")[-3000:]
            raise KernelUnavailable(
                f"the guest reported no exit status (qemu exit {console.returncode} after "
                f"{time.monotonic() - started:.0f}s); console:\n{tail}\n{output}"
            )
        return GuestRun(int(status_text), output)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    try:
        folder = build(progress=True)
        if "--check" in argv:
            result = run("uname -r; cat /proc/sys/net/ipv4/tcp_available_ulp", folder=folder)
            print(result.output, end="")
            if result.status:
                raise KernelUnavailable(f"the guest's check exited {result.status}")
    except KernelUnavailable as exc:
        print(f"kTLS test guest: {exc}", file=sys.stderr)
        return 1
    print(f"kTLS test guest ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
