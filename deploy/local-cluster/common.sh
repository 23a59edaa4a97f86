# Shared settings for build/up/down/exec (sourced, not executed).
K8S_VERSION=${K8S_VERSION:-v1.36.3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${SHOAL_CACHE:-$HOME/.cache/shoal}/k8s-$K8S_VERSION
BIN=$CACHE/bin
STAGES=$CACHE/stages
STATE=${SHOAL_CLUSTER_DIR:-/tmp/shoal-cluster}
# Addresses inside the private network namespace (10.244.0.0/16 is local on its loopback).
NET_CIDR=${SHOAL_NET_CIDR:-10.244.0.0/16}
API_IP=${SHOAL_API_IP:-10.244.0.1}
API_PORT=${SHOAL_API_PORT:-6443}
SERVICE_CIDR=${SHOAL_SERVICE_CIDR:-10.96.0.0/16}
SERVICE_IP=${SHOAL_SERVICE_IP:-10.96.0.1}  # first address of SERVICE_CIDR: the kubernetes Service
KUBECONFIG_PATH=$STATE/kubeconfig
# Every local cluster serves the same API address (inside its own namespace), so kubectl's
# discovery cache (keyed by host:port, ~/.kube/cache by default) would leak resource types from
# one cluster to the next: keep it per cluster.
export KUBECACHEDIR=$STATE/kube-cache

holder_pid() { cat "$STATE/pids/netns-holder" 2>/dev/null; }
holder_alive() { local p; p=$(holder_pid) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null && [ -e "/proc/$p/ns/net" ]; }
# Run a command inside the cluster's network namespace.
in_ns() { nsenter --net="/proc/$(holder_pid)/ns/net" -- "$@"; }
