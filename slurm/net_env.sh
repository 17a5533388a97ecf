# Sourced by slurm/train.sbatch on every node (inside srun, before train.py): gloo (the per-step stop agreement,
# CPU collectives) and NCCL bind the address the host name resolves to, which is 127.0.1.1 on Debian-style
# /etc/hosts, so ranks on other nodes cannot reach it. Unless the user set them, export GLOO_SOCKET_IFNAME and
# NCCL_SOCKET_IFNAME as the interface this node reaches another node of the job through
# (`ip -o route get <peer address>`); one-node jobs keep the defaults (loopback works there).
scaleclr_export_ifname() {
    local me peer addr dev
    me=${SLURMD_NODENAME:-$(hostname -s)}
    peer=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | grep -vx "$me" | head -n 1)
    [ -n "$peer" ] || return 0
    addr=$(getent ahostsv4 "$peer" | awk 'NR == 1 {print $1}')
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)
    if [ -z "$dev" ] || [ "$dev" = lo ]; then
        echo "scaleclr: no interface routes from $me to $peer ($addr); set GLOO_SOCKET_IFNAME yourself" >&2
        return 0
    fi
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$dev}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$dev}"
}
scaleclr_export_ifname
