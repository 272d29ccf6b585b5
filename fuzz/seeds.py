#!/usr/bin/env python3
"""Writes a starting corpus for each fuzz target into fuzz/corpus/<target>/: real inputs
(a TLS ClientHello offering Moat's ALPN, HTTP exchanges, tunnel frames, the policy examples of
docs/policy.md, a CSR made by openssl, signed-claim and raw JWTs, TokenReview answers, and the
real-world pods of ../shared/corpus/k8s wrapped in AdmissionReviews). The fuzzer mutates from
there, reaching deep code much sooner than from nothing."""

import base64
import json
import pathlib
import re
import socket
import ssl
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "corpus"


WRITTEN = []


def put(target, name, data):
    WRITTEN.append((target, name))
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def client_hello(alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="10.0.0.7")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def frame(kind, payload=b""):
    return bytes([kind]) + len(payload).to_bytes(3, "big") + payload


def chunks(parts):
    """Encodes (side, bytes) pairs as the http1_observer target reads them."""
    out = b""
    for side, data in parts:
        for i in range(0, len(data), 127):
            piece = data[i : i + 127]
            out += bytes([(0x80 if side == "server" else 0) | len(piece)]) + piece
    return out


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def claims(**over):
    c = {
        "iss": "https://kubernetes.default.svc",
        "aud": ["moat-ca"],
        "sub": "system:serviceaccount:shop:web",
        "exp": 4102444800,
        "iat": 1700000000,
        "nbf": 1700000000,
        "kubernetes.io": {
            "namespace": "shop",
            "serviceaccount": {"name": "web", "uid": "5b1c"},
            "pod": {"name": "web-0", "uid": "9f2e"},
        },
    }
    c.update(over)
    return json.dumps(c).encode()


def main():
    # detect
    for i, alpn in enumerate([["moat/1"], ["h2", "http/1.1"], []]):
        put("detect", f"client-hello-{i}", client_hello(alpn))
    put("detect", "http1", b"GET /orders HTTP/1.1\r\nHost: api\r\n\r\n")
    put("detect", "h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    put("detect", "opaque", b"\x00\x01binary")

    # tunnel: the OPEN frame, data, then FIN or RESET
    open_frame = frame(1, (8080).to_bytes(2, "big"))
    put("tunnel", "data-fin", open_frame + frame(2, b"hello") + frame(3))
    put("tunnel", "reset", frame(2, b"x") + frame(4, b"\x01denied by policy"))
    put("tunnel", "empty-data", frame(2) + frame(2, b"y" * 300) + frame(3))

    # http1_observer
    req = b"POST /pay HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\n\r\nhello"
    resp = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nworld\r\n0\r\n\r\n"
    put("http1_observer", "exchange", chunks([("client", req), ("server", resp)]))
    put(
        "http1_observer",
        "pipelined",
        chunks([("client", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 2),
                ("server", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                ("server", b"HTTP/1.1 204 No Content\r\n\r\n")]),
    )

    # policy: every Policy example of the docs
    doc = (ROOT / "docs" / "policy.md").read_text()
    for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc, re.S)):
        if "kind: Policy" in block:
            put("policy", f"doc-{i}", block)

    # csr: made by openssl, the way a workload would
    with tempfile.TemporaryDirectory() as tmp:
        key = pathlib.Path(tmp) / "key.pem"
        for name, san in [("own", "URI:spiffe://cluster.local/ns/shop/sa/web"),
                          ("foreign", "URI:spiffe://cluster.local/ns/kube-system/sa/admin,DNS:api.shop")]:
            pem = subprocess.run(
                ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(key), "-subj", "/", "-addext", f"subjectAltName={san}"],
                check=True, capture_output=True).stdout
            put("csr", f"{name}.pem", b"\x00" + pem)
            der = base64.b64decode(b"".join(l for l in pem.splitlines() if not l.startswith(b"-----")))
            put("csr", f"{name}.der", b"\x01" + der)

    # jwt: even first byte = claims the target signs; odd = a raw token
    put("jwt", "bound", b"\x00" + claims())
    put("jwt", "unbound", b"\x00" + claims(**{"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "web", "uid": "1"}}}))
    put("jwt", "expired", b"\x00" + claims(exp=1700000001))
    header = b64url(b'{"alg":"ES256","kid":"fuzz","typ":"JWT"}')
    put("jwt", "raw", b"\x01" + f"{header}.{b64url(claims())}.{b64url(b'0' * 64)}".encode())
    none = b64url(b'{"alg":"none"}')
    put("jwt", "none-alg", b"\x01" + f"{none}.{b64url(claims())}.".encode())

    # token_review
    status = {"authenticated": True, "audiences": ["moat-ca"],
              "user": {"username": "system:serviceaccount:shop:web",
                       "extra": {"authentication.kubernetes.io/pod-name": ["web-0"],
                                 "authentication.kubernetes.io/pod-uid": ["9f2e"]}}}
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": status}
    put("token_review", "bound", json.dumps(review))
    put("token_review", "refused", json.dumps({**review, "status": {"authenticated": False, "error": "bad"}}))

    # admission: the shared real-world pods, each wrapped in an AdmissionReview
    try:
        import yaml
    except ImportError:
        sys.exit("seeds.py: PyYAML is needed (tests/setup.sh installs it into .venv/)")
    corpus = ROOT.parent / "shared" / "corpus" / "k8s"
    n = 0
    for path in sorted(corpus.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".json", ".injected"):
            continue
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError:
            continue
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "AdmissionReview":
                put("admission", f"review-{n}", json.dumps(doc))
                n += 1
                continue
            if doc.get("kind") != "Pod" and isinstance((doc.get("spec") or {}).get("template"), dict):
                doc = {"apiVersion": "v1", "kind": "Pod", **doc["spec"]["template"]}
            if doc.get("kind") == "Pod":
                req = {"uid": f"u{n}", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                       "resource": {"group": "", "version": "v1", "resource": "pods"},
                       "namespace": (doc.get("metadata") or {}).get("namespace", "shop"),
                       "operation": "CREATE", "object": doc}
                put("admission", f"pod-{n}", json.dumps(
                    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}))
            else:
                continue
            n += 1
    if n == 0:
        sys.exit(f"seeds.py: no pod or AdmissionReview found under {corpus}")
    print(f"seeds: wrote {len(WRITTEN)} seed inputs under {OUT}")


if __name__ == "__main__":
    main()
