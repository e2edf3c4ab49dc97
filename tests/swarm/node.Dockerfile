# One image for the throwaway Swarm test cluster (tests/swarm/cluster.py): the nodes run its
# Docker engine (CMD dockerd, Docker-in-Docker), the registry runs Debian's docker-registry from
# it. Everything comes from Debian's archive over apt: containers here reach nothing else.
#   docker build -f tests/swarm/node.Dockerfile -t local/swarm-node:bookworm tests/swarm
ARG BASE_IMAGE=local/debian-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      docker.io iproute2 iptables procps ca-certificates docker-registry \
 && rm -rf /var/lib/apt/lists/*
# The registry's config: filesystem storage (a volume), :5000, no auth (it is reachable only on
# the test's own bridge network and on the host's loopback).
COPY registry.yml /etc/swarm-node/registry.yml
CMD ["dockerd"]
