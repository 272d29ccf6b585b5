#!/usr/bin/env python3
"""Assembles the cluster tests' container images from binaries on this machine.

The test machines have no container engine and no registry, so images cannot be built with
`docker build` (deploy/images/Dockerfile) nor pulled. This writes each image as a `docker save`
archive (manifest.json, an image config, one uncompressed layer) that
`ctr -n k8s.io images import` loads into the node's containerd:

  pause          localhost/pause:3.10                   the sandbox image (Kubernetes' pause.c)
  moat-e2e-app   localhost/moat-e2e-app:latest          busybox: sh, httpd, wget, nc...
  moat-ca        ghcr.io/moat-mesh/moat-ca:0.1.0        as the Dockerfile: binary + its libraries
  moat-injector  ghcr.io/moat-mesh/moat-injector:0.1.0
  moat-proxy     ghcr.io/moat-mesh/moat-proxy:0.1.0     + the iptables tools the init step runs
  moat-destination ghcr.io/moat-mesh/moat-destination:0.1.0

Layers are deterministic (sorted, mtime 0), so an unchanged input gives the same archive and
up.sh skips its import.

usage: oci.py --out DIR --bin-dir MOAT_RELEASE_DIR --k8s-bin K8S_BIN [IMAGE...]
"""
import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOAT_TAG = "0.1.0"


class Missing(Exception):
    pass


class Layer:
    """One image layer, built in memory: path -> (TarInfo, bytes or None)."""

    def __init__(self):
        self.entries = {}

    def _info(self, path, kind, mode, uid=0, gid=0):
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, 0
        return info

    def dir(self, path, mode=0o755, uid=0, gid=0):
        if not path.strip("/"):
            return
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent.lstrip("/") not in self.entries:
                self.entries[parent.lstrip("/")] = (self._info(parent, tarfile.DIRTYPE, 0o755), None)
        self.entries[path.strip("/")] = (self._info(path, tarfile.DIRTYPE, mode, uid, gid), None)

    def file(self, path, data, mode=0o644):
        self.dir(os.path.dirname(path))
        info = self._info(path, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.entries[path.lstrip("/")] = (info, data)

    def symlink(self, path, target):
        self.dir(os.path.dirname(path))
        info = self._info(path, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.entries[path.lstrip("/")] = (info, None)

    def copy(self, src, dest=None):
        """Copies a host file. Copied to its own path, the symlinks leading to it are kept as
        symlinks (the loader and libraries are found by those names); copied elsewhere, it
        becomes a regular file."""
        if dest is None and os.path.islink(src):
            target = os.readlink(src)
            self.symlink(src, target)
            self.copy(os.path.normpath(os.path.join(os.path.dirname(src), target)))
            return
        self.file(dest or src, read(os.path.realpath(src)), os.stat(src).st_mode & 0o7777)

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for name in sorted(self.entries):
                info, data = self.entries[name]
                t.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Missing(path) from None


def libraries(binary):
    """The shared libraries `binary` loads (ldd), the dynamic loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if "not a dynamic executable" in out.stdout + out.stderr:
        return []
    if out.returncode != 0:
        raise Missing(f"{binary} (ldd: {out.stderr.strip()})")
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def add_program(layer, src, dest=None):
    layer.copy(src, dest)
    for lib in libraries(src):
        layer.copy(lib)


def base(layer, users):
    """/etc/passwd and /etc/group for `users` (name, uid), and a world-writable /tmp."""
    layer.file("/etc/passwd", "".join(f"{n}:x:{u}:{u}:{n}:/nonexistent:/sbin/nologin\n"
                                      for n, u in [("root", 0)] + users).encode())
    layer.file("/etc/group", "".join(f"{n}:x:{u}:\n" for n, u in [("root", 0)] + users).encode())
    layer.dir("/tmp", 0o1777)


def pause(a):
    layer = Layer()
    base(layer, [("nobody", 65535)])
    layer.file("/pause", read(os.path.join(a.k8s_bin, "pause")), 0o755)
    return "localhost/pause:3.10", layer, {"Entrypoint": ["/pause"], "User": "65535:65535"}


def app(a):
    busybox = "/bin/busybox"
    if libraries(busybox):
        raise Missing(f"{busybox} is not statically linked (install Debian's busybox-static)")
    layer = Layer()
    base(layer, [("nobody", 65534)])
    layer.file("/bin/busybox", read(busybox), 0o755)
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            layer.symlink(f"/bin/{applet}", "busybox")
    layer.dir("/www")
    return "localhost/moat-e2e-app:latest", layer, {"Cmd": ["sh"]}


def moat(name, user, extra=None):
    def build(a):
        layer = Layer()
        base(layer, [user])
        add_program(layer, os.path.join(a.bin_dir, name), f"/usr/local/bin/{name}")
        if extra:
            extra(layer)
        uid = user[1]
        config = {"Entrypoint": [f"/usr/local/bin/{name}"], "User": f"{uid}:{uid}"}
        return f"ghcr.io/moat-mesh/{name}:{MOAT_TAG}", layer, config
    return build


def iptables(layer):
    """The init step's tools (proxy/src/redirect.rs looks up iptables-restore/-save and their
    -legacy/-nft flavours, for both families), as Debian's multi-call binaries and the
    extensions they load at run time."""
    for multi, flavour in [("xtables-nft-multi", "nft"), ("xtables-legacy-multi", "legacy")]:
        add_program(layer, f"/usr/sbin/{multi}")
        for fam in ["iptables", "ip6tables"]:
            for verb in ["restore", "save"]:
                layer.symlink(f"/usr/sbin/{fam}-{flavour}-{verb}", multi)
                if flavour == "nft":  # Debian's default backend
                    layer.symlink(f"/usr/sbin/{fam}-{verb}", multi)
            if flavour == "nft":
                layer.symlink(f"/usr/sbin/{fam}", multi)
    ext = "/usr/lib/x86_64-linux-gnu/xtables"
    if not os.path.isdir(ext):
        raise Missing(f"{ext} (install Debian's iptables)")
    for so in sorted(os.listdir(ext)):
        add_program(layer, os.path.join(ext, so))
    layer.dir("/run", 0o755, 0, 0)


IMAGES = {
    "pause": pause,
    "moat-e2e-app": app,
    "moat-ca": moat("moat-ca", ("nonroot", 65532)),
    "moat-injector": moat("moat-injector", ("nonroot", 65532)),
    "moat-destination": moat("moat-destination", ("nonroot", 65532)),
    "moat-proxy": moat("moat-proxy", ("moat", 7777), iptables),
}


def archive(ref, layer, config):
    """A `docker save` archive of one single-layer image."""
    blob = layer.tar()
    diff_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    cfg = dict(config)
    cfg.setdefault("Env", [f"PATH={PATH}"])
    image = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/cluster/oci.py"}],
    }
    image_json = json.dumps(image, sort_keys=True).encode()
    image_id = hashlib.sha256(image_json).hexdigest()
    out = Layer()
    out.file(f"{image_id}.json", image_json)
    out.file(f"{diff_id[7:]}/layer.tar", blob)
    manifest = [{"Config": f"{image_id}.json", "RepoTags": [ref], "Layers": [f"{diff_id[7:]}/layer.tar"]}]
    out.file("manifest.json", json.dumps(manifest).encode())
    return out.tar()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--bin-dir", required=True, help="Moat's release binaries (target/release)")
    p.add_argument("--k8s-bin", required=True, help="the cluster's binaries (build.sh)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help=f"of {', '.join(IMAGES)} (default: all)")
    a = p.parse_args()
    for name in a.images:
        if name not in IMAGES:
            p.error(f"unknown image {name!r} (known: {', '.join(IMAGES)})")
    os.makedirs(a.out, exist_ok=True)
    for name in a.images or IMAGES:
        try:
            data = archive(*IMAGES[name](a))
        except Missing as e:
            sys.exit(f"oci.py: cannot build image {name}: missing {e} "
                     "(Moat binaries: cargo build --release; pause: tests/cluster/build.sh)")
        path = os.path.join(a.out, f"{name}.tar")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        print(path)


if __name__ == "__main__":
    main()
