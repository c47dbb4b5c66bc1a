"""Generate an OCI image layout on disk, and read one back, for skopeo to push and pull;
and root filesystem tarballs for `docker import`.

Layers are gzip tarballs of random bytes: already compressed, so skopeo sends them as they
are (with --preserve-digests it refuses to change a digest), and the pulled copy must be
byte-identical. gzip level 0 keeps generation fast; random content keeps each run unique.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    layout: Path
    tag: str
    manifest_digest: str
    blobs: dict[str, int]  # digest -> size: config and layers, not the manifest
    layer_sizes: tuple[int, ...]


def _put_blob(layout: Path, data: bytes) -> str:
    digest = _digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _tar(index: int, size: int) -> bytes:
    """A tar holding one file of `size` random bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"layer{index}/payload.bin")
        info.size = size
        info.mtime = 0
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return raw.getvalue()


def _layer(index: int, size: int) -> tuple[bytes, bytes]:
    """Return (uncompressed tar, gzip of it) holding one file of `size` random bytes."""
    tar_bytes = _tar(index, size)
    return tar_bytes, gzip.compress(tar_bytes, compresslevel=0, mtime=0)


def rootfs_tar(path: Path, size: int) -> Path:
    """Write a root filesystem tarball for `docker import`: one file of `size` random bytes,
    so every image made from one is new to the registry and its layer must really travel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar(0, size))
    return path


def build(layout: Path, tag: str, layer_sizes: tuple[int, ...]) -> Image:
    layout.mkdir(parents=True, exist_ok=True)
    layers, diff_ids, blobs = [], [], {}
    for index, size in enumerate(layer_sizes):
        tar_bytes, gz = _layer(index, size)
        digest = _put_blob(layout, gz)
        blobs[digest] = len(gz)
        diff_ids.append(_digest(tar_bytes))
        layers.append({"mediaType": LAYER, "digest": digest, "size": len(gz)})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/layer0/payload.bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, sort_keys=True).encode()
    config_digest = _put_blob(layout, config)
    blobs[config_digest] = len(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layers,
    }, sort_keys=True).encode()
    manifest_digest = _put_blob(layout, manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST, "digest": manifest_digest,
                       "size": len(manifest), "annotations": {REF_NAME: tag}}],
    }))
    return Image(layout, tag, manifest_digest, blobs,
                 tuple(layer["size"] for layer in layers))


def read(layout: Path, tag: str) -> tuple[str, dict[str, int]]:
    """Return (manifest digest, {blob digest: size}) of `tag` in a layout.

    Every blob the manifest names is hashed from disk: a digest that does not match its
    content raises, so a corrupted pull cannot pass as identical.
    """
    index = json.loads((layout / "index.json").read_text())
    entries = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    if len(entries) != 1:
        raise AssertionError(f"{layout}: {len(entries)} manifests tagged {tag!r}")

    def load(digest: str) -> bytes:
        data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
        if _digest(data) != digest:
            raise AssertionError(f"{layout}: blob {digest} hashes to {_digest(data)}")
        return data

    manifest_digest = entries[0]["digest"]
    manifest = json.loads(load(manifest_digest))
    blobs = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        data = load(descriptor["digest"])
        if len(data) != descriptor["size"]:
            raise AssertionError(f"{layout}: blob {descriptor['digest']} has {len(data)} bytes")
        blobs[descriptor["digest"]] = len(data)
    return manifest_digest, blobs
