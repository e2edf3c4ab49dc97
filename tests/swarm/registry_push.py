"""Push host images to the test registry with uncompressed layers, through the Registry HTTP API.

Why not ``docker push``: it gzips every layer on one core, and the application image's 600 MB
base layer took 72 s to push on this 2-core machine (then each node spent its pull gunzipping it
again). Here one ``docker save`` of all the images writes each layer once (shared base layers
included), each layer goes to the registry as it is (media type
``application/vnd.docker.image.rootfs.diff.tar`` of Docker's schema 2; the layer's digest is its
diff id from the image config), a layer
already uploaded for another repository is mounted instead of sent again, and a schema 2
manifest names them. Nodes pull these images like any other (the engine detects that a layer is
not compressed), so the image a node runs has the same id as the host's.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar"
BLOCK = 1 << 20


@dataclass(frozen=True)
class Target:
    """One image to push: the host's tag and the repository and tag in the registry."""

    local_tag: str
    repo: str
    tag: str


class RegistryClient:
    """The few Registry API v2 calls a push needs, over plain HTTP (the registry has no auth)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300, blocksize=BLOCK)
        try:
            try:
                conn.request(method, path, body=body, headers=headers or {})
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The registry answered (and closed) before the body was sent: say what it said.
                try:
                    early = conn.getresponse()
                    said = f"HTTP {early.status}: {early.read()[:500]!r}"
                except Exception:
                    said = "no response"
                raise RuntimeError(f"registry {method} {path}: {exc} ({said})") from exc
            response = conn.getresponse()
            text = response.read()
        finally:
            conn.close()
        if response.status not in expect:
            raise RuntimeError(
                f"registry {method} {path}: HTTP {response.status} (expected {expect}): "
                f"{text[:500]!r}"
            )
        return response

    def has_blob(self, repo: str, digest: str) -> bool:
        response = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", expect=(200, 404))
        return response.status == 200

    def mount_blob(self, repo: str, digest: str, source_repo: str) -> bool:
        """Link a blob already stored for ``source_repo``; False when the registry declines."""
        response = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?mount={digest}&from={source_repo}",
            expect=(201, 202),
        )
        return response.status == 201

    def upload_blob(self, repo: str, digest: str, data: IO[bytes] | bytes, size: int) -> None:
        """A monolithic upload: POST for a location, one PUT with the blob and its digest."""
        response = self._request("POST", f"/v2/{repo}/blobs/uploads/", expect=(202,))
        location = urlsplit(response.getheader("Location", ""))
        query = f"{location.query}&digest={digest}" if location.query else f"digest={digest}"
        self._request(
            "PUT",
            f"{location.path}?{query}",
            body=data,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            expect=(201,),
        )

    def put_manifest(self, repo: str, tag: str, manifest: dict[str, Any]) -> None:
        body = json.dumps(manifest).encode()
        self._request(
            "PUT",
            f"/v2/{repo}/manifests/{tag}",
            body=body,
            headers={"Content-Type": MANIFEST_TYPE, "Content-Length": str(len(body))},
            expect=(201,),
        )


def push_images(registry: RegistryClient, targets: list[Target]) -> None:
    """Save the images once, then upload each blob once per registry and a manifest per tag."""
    with tempfile.TemporaryDirectory(prefix="cst-swarm-push-") as tmp:
        archive = Path(tmp) / "images.tar"
        proc = subprocess.run(
            ["docker", "save", "-o", str(archive), *(t.local_tag for t in targets)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"docker save {[t.local_tag for t in targets]}: {proc.stderr}")
        with tarfile.open(archive) as tar:
            index = json.load(_member(tar, "manifest.json"))
            by_tag = {tag: entry for entry in index for tag in entry.get("RepoTags") or []}
            stored: dict[str, str] = {}  # digest -> a repository that has it
            for target in targets:
                entry = by_tag.get(target.local_tag) or by_tag.get(f"{target.local_tag}:latest")
                if entry is None:
                    raise RuntimeError(f"push: {target.local_tag} is not in docker save's output")
                config_bytes = _member(tar, entry["Config"]).read()
                config = json.loads(config_bytes)
                diff_ids: list[str] = config["rootfs"]["diff_ids"]
                if len(diff_ids) != len(entry["Layers"]):
                    raise RuntimeError(f"push: {target.local_tag}: layers and diff_ids disagree")
                layers = []
                for path, digest in zip(entry["Layers"], diff_ids, strict=True):
                    # docker save stores a layer that another already holds as a symlink to it
                    # (a member of size 0): the size is that of the content it resolves to.
                    size = _member(tar, path).seek(0, io.SEEK_END)
                    _ensure_blob(registry, target.repo, digest, stored,
                                 lambda p=path: _member(tar, p), size)  # fmt: skip
                    layers.append({"mediaType": LAYER_TYPE, "size": size, "digest": digest})
                config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
                _ensure_blob(registry, target.repo, config_digest, stored,
                             lambda b=config_bytes: b, len(config_bytes))  # fmt: skip
                registry.put_manifest(
                    target.repo,
                    target.tag,
                    {
                        "schemaVersion": 2,
                        "mediaType": MANIFEST_TYPE,
                        "config": {
                            "mediaType": CONFIG_TYPE,
                            "size": len(config_bytes),
                            "digest": config_digest,
                        },
                        "layers": layers,
                    },
                )


def _ensure_blob(
    registry: RegistryClient,
    repo: str,
    digest: str,
    stored: dict[str, str],
    data: Any,
    size: int,
) -> None:
    """Upload a blob unless the repository has it or can mount it from one that has."""
    if registry.has_blob(repo, digest):
        stored.setdefault(digest, repo)
        return
    source = stored.get(digest)
    if source is None or not registry.mount_blob(repo, digest, source):
        registry.upload_blob(repo, digest, data(), size)
    stored.setdefault(digest, repo)


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    handle = tar.extractfile(name)
    if handle is None:
        raise RuntimeError(f"push: {name} missing from docker save's output")
    return handle
