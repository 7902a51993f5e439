// nodeproxy same-node fast path (bpf/README.md, "Fast path").  One set per node, pinned under
// /sys/fs/bpf/nodeproxy/fastpath/: the loopback hop between an application socket and the
// agent's outbound listener socket in the same pod is short-circuited with sk_msg.
//
//   np_fast_sockops  sock_ops on the agent's cgroup and on every captured pod's cgroup: an
//                    established connection to/from the outbound port (the app's connect
//                    that np_connect4 redirected, and the agent's accepted end of it) enters
//                    the sockhash, keyed by its own 4-tuple.
//   np_fast_msg      sk_msg verdict on the sockhash: a sendmsg on one end is put straight into
//                    the other end's receive queue (bpf_msg_redirect_hash, BPF_F_INGRESS);
//                    when the other end is not in the map the bytes take the normal path.

#include <uapi/linux/bpf.h>

#ifndef NP_OUTBOUND_PORT
#define NP_OUTBOUND_PORT 15001
#endif

struct np_sockkey {
    u32 sip;    // network order
    u32 dip;    // network order
    u16 sport;  // host order
    u16 dport;  // host order
};

BPF_SOCKHASH(np_sockhash, struct np_sockkey, 65535);

int np_fast_sockops(struct bpf_sock_ops *skops) {
    if (skops->family != 2 /* AF_INET */)
        return 1;
    u32 op = skops->op;
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    u16 lport = (u16)skops->local_port;
    u16 rport = bpf_ntohs((u16)(skops->remote_port >> 16));
    // Only the two ends of a captured outbound connection, both inside one pod's netns.
    if (skops->local_ip4 != skops->remote_ip4)
        return 1;
    if (!((op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && rport == NP_OUTBOUND_PORT) ||
          (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && lport == NP_OUTBOUND_PORT)))
        return 1;
    struct np_sockkey key = {};
    key.sip = skops->local_ip4;
    key.dip = skops->remote_ip4;
    key.sport = lport;
    key.dport = rport;
    np_sockhash.sock_hash_update(skops, &key, BPF_NOEXIST);
    return 1;
}

int np_fast_msg(struct sk_msg_md *msg) {
    struct np_sockkey peer = {};
    peer.sip = msg->remote_ip4;
    peer.dip = msg->local_ip4;
    peer.sport = bpf_ntohs((u16)(msg->remote_port >> 16));
    peer.dport = (u16)msg->local_port;
    np_sockhash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    return SK_PASS;
}
