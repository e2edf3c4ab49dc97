"""Can this kernel hold the IPsec state Docker's encrypted overlay networks need?

compose/scripts/swarm.sh runs this on each node (`docker run --network none --cap-add NET_ADMIN`,
python -c) before deploying a stack with encrypted overlays. It does what the overlay driver does
for an encrypted network, in the container's own network namespace (thrown away on exit): add one
ESP security association, transport mode, AES-GCM as rfc4106(gcm(aes)) with a 128-bit key and a
32-bit salt, 64-bit ICV, over netlink (NETLINK_XFRM, XFRM_MSG_NEWSA).

Exit 0: the kernel accepted it. Exit 3: the kernel refused it in a way that means encrypted
overlays cannot work on this node (no xfrm netlink, no ESP or no AES-GCM: ENOSYS, ENOENT,
EPROTONOSUPPORT...). Exit 4: some other error; the check cannot tell (the caller warns only).
"""

import errno
import os
import socket
import struct
import sys

CANNOT = {errno.ENOSYS, errno.ENOENT, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP}


def addr(ip: str) -> bytes:
    return socket.inet_aton(ip) + bytes(12)  # xfrm_address_t: 16 bytes


def main() -> int:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 6)  # NETLINK_XFRM
        sock.bind((0, 0))
    except OSError as exc:
        print(f"no xfrm netlink socket: {exc.strerror}")
        return 3 if exc.errno in CANNOT else 4
    dst, src, inf = "10.255.0.2", "10.255.0.1", 2**64 - 1
    # struct xfrm_usersa_info (224 bytes): selector, id (daddr, spi, proto ESP), saddr,
    # lifetime_cfg, lifetime_cur, stats, seq, reqid, family, mode (transport), replay, flags.
    selector = addr(dst) + addr(src) + struct.pack("=HHHHHBBB3xiI", 0, 0, 0, 0, 2, 32, 32, 0, 0, 0)
    info = (
        selector
        + addr(dst) + struct.pack(">I", 0x1234) + struct.pack("B3x", socket.IPPROTO_ESP)
        + addr(src)
        + struct.pack("=8Q", inf, inf, inf, inf, 0, 0, 0, 0)
        + bytes(32 + 12)
        + struct.pack("=IIHBBB7x", 0, 1, socket.AF_INET, 0, 0, 0)
    )  # fmt: skip
    # XFRMA_ALG_AEAD: struct xfrm_algo_aead (name[64], key bits, ICV bits) and the key (+ salt).
    aead = b"rfc4106(gcm(aes))".ljust(64, b"\0") + struct.pack("=II", 160, 64) + bytes(range(1, 21))
    body = info + struct.pack("=HH", 4 + len(aead), 18) + aead
    flags = 0x1 | 0x4 | 0x200 | 0x400  # NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE
    sock.send(struct.pack("=IHHII", 16 + len(body), 0x10, flags, 1, 0) + body)  # XFRM_MSG_NEWSA
    reply = sock.recv(65536)
    code = (
        struct.unpack_from("=i", reply, 16)[0] if struct.unpack_from("=H", reply, 4)[0] == 2 else 0
    )
    if code == 0:
        print("ok: the kernel accepts an IPsec ESP state (rfc4106(gcm(aes)))")
        return 0
    print(f"the kernel refused an IPsec ESP state (rfc4106(gcm(aes))): {os.strerror(-code)}")
    return 3 if -code in CANNOT else 4


if __name__ == "__main__":
    sys.exit(main())
