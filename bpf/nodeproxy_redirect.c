// nodeproxy eBPF redirection for one pod (bpf/README.md).  Compiled and loaded by bcc
// (redirect/ebpf/loader.py); every object below is pinned under
// /sys/fs/bpf/nodeproxy/<pod>/ so capture outlives the agent.
//
//   np_connect4  cgroup/connect4 on the pod's cgroup: a TCP connect() made in the pod's netns
//                goes to the agent's outbound listener (pod IP:15001); the original
//                destination is kept by socket cookie.
//   np_connect6  cgroup/connect6 on the pod's cgroup: the same for AF_INET6 sockets.  An
//                IPv4-mapped destination (::ffff:a.b.c.d: an IPv4 connection made through a
//                dual-stack socket) is always captured, to the pod's IPv4 address, and
//                recorded like connect4's; a native IPv6 destination only with IPv6 capture
//                on (pod_ip6 set), to [pod IPv6]:15001, recorded in the IPv6 maps.
//   np_sockops   sock_ops on the pod's cgroup: when that connect picks its source port
//                (TCP_CONNECT_CB) the original destination is re-keyed by (source IP, source
//                port), which is what the agent sees as the peer of the accepted socket.
//   np_ingress   tc ingress on the pod's interfaces: a TCP SYN for any port but HBONE (and
//                the excluded ones) is assigned to the agent's inbound plaintext listener
//                (bpf_sk_assign, like TPROXY: the local address stays the original
//                destination and the source IP is untouched).  No listener: dropped.
//                IPv6 SYNs only with IPv6 capture on (to the agent's IPv6 listener).
//   np_lo_mark   tc ingress on the pod's lo: a SYN the agent sent (SO_MARK proxy_mark) gets
//                the connmark instead, so with net.ipv4.tcp_fwmark_accept=1 the pod's
//                accepted socket carries it and policy routing sends the replies to a
//                source-spoofed agent socket back through lo.
//
// tc programs answer TC_ACT_UNSPEC for every packet they leave alone, so filters of other
// software on the same hook still run (TC_ACT_OK would end the filter chain); only a SYN
// assigned to the agent's listener ends it (TC_ACT_OK) and a SYN with no listener is dropped.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

struct np_cfg {
    u64 netns_cookie;   // the pod's netns (SO_NETNS_COOKIE); other namespaces are ignored
    u32 pod_ip4;        // network order; the outbound listener's address, never redirected
    u32 proxy_mark;
    u32 connmark;
    u32 mark_mask;
    u32 probe_ip4;      // network order; 0 = none
    u16 outbound_port;  // host order
    u16 inbound_port;
    u16 hbone_port;
    u16 pad;
    u32 pod_ip6[4];     // network order; all zero = no IPv6 capture (only IPv4-mapped)
};

struct np_orig {
    u32 ip4;    // network order
    u16 port;   // network order
    u16 pad;
};

BPF_ARRAY(np_config, struct np_cfg, 1);
BPF_TABLE("lru_hash", u64, struct np_orig, np_by_cookie, 65536);
// key: (source IPv4 in network order) << 16 | source port (host order)
BPF_TABLE("lru_hash", u64, struct np_orig, np_origdst, 65536);
BPF_HASH(np_skip_inbound, u16, u8, 64);       // port (host order) -> 1
BPF_HASH(np_skip_uid, u32, u8, 64);           // uid -> 1
// IPv6: the original destination by socket cookie, then by (source IPv6, source port).
struct np_orig6 {
    u32 ip6[4];  // network order
    u16 port;    // network order
    u16 pad;
};
struct np_key6 {
    u32 ip6[4];  // the connecting socket's source address, network order
    u32 port;    // its source port, host order
};
BPF_TABLE("lru_hash", u64, struct np_orig6, np_by_cookie6, 65536);
BPF_TABLE("lru_hash", struct np_key6, struct np_orig6, np_origdst6, 65536);

static __always_inline struct np_cfg *np_get_cfg(void) {
    int zero = 0;
    return np_config.lookup(&zero);
}

// An IPv4 destination (np_connect4, and np_connect6 for an IPv4-mapped one): the checks, and
// the original destination recorded by socket cookie; 1 = redirect it to pod IP:15001.
static __always_inline int np_capture4(struct np_cfg *cfg, struct bpf_sock_addr *ctx,
                                       u32 dst, u16 port) {
    if (ctx->protocol != IPPROTO_TCP)
        return 0;
    if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
        return 0;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    // Defence in depth: the agent is not in the pod's cgroup, and its sockets carry the mark.
    if ((sk->mark & cfg->mark_mask) == cfg->proxy_mark)
        return 0;
    if ((bpf_ntohl(dst) >> 24) == 127 || dst == cfg->pod_ip4)
        return 0;
    u32 uid = (u32)bpf_get_current_uid_gid();
    if (np_skip_uid.lookup(&uid))
        return 0;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct np_orig orig = {};
    orig.ip4 = dst;
    orig.port = port;
    np_by_cookie.update(&cookie, &orig);
    return 1;
}

int np_connect4(struct bpf_sock_addr *ctx) {
    struct np_cfg *cfg = np_get_cfg();
    if (!cfg || cfg->outbound_port == 0)
        return 1;
    if (!np_capture4(cfg, ctx, ctx->user_ip4, (u16)ctx->user_port))
        return 1;
    ctx->user_ip4 = cfg->pod_ip4;
    ctx->user_port = bpf_htons(cfg->outbound_port);
    return 1;
}

int np_connect6(struct bpf_sock_addr *ctx) {
    struct np_cfg *cfg = np_get_cfg();
    if (!cfg || cfg->outbound_port == 0)
        return 1;
    // 4-byte loads (volatile: clang must not merge them into 8-byte context loads).
    u32 d0 = *(volatile u32 *)&ctx->user_ip6[0], d1 = *(volatile u32 *)&ctx->user_ip6[1],
        d2 = *(volatile u32 *)&ctx->user_ip6[2], d3 = *(volatile u32 *)&ctx->user_ip6[3];
    u16 port = (u16)ctx->user_port;
    if (d0 == 0 && d1 == 0 && d2 == bpf_htonl(0xffff)) {
        // ::ffff:a.b.c.d: the kernel connects over IPv4 (the connect4 hook does not run).
        if (!np_capture4(cfg, ctx, d3, port))
            return 1;
        ctx->user_ip6[3] = cfg->pod_ip4;
        ctx->user_port = bpf_htons(cfg->outbound_port);
        return 1;
    }
    u32 p0 = cfg->pod_ip6[0], p1 = cfg->pod_ip6[1], p2 = cfg->pod_ip6[2], p3 = cfg->pod_ip6[3];
    if ((p0 | p1 | p2 | p3) == 0)
        return 1;  // IPv6 capture off
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    if (bpf_get_netns_cookie(ctx) != cfg->netns_cookie)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    if ((sk->mark & cfg->mark_mask) == cfg->proxy_mark)
        return 1;
    if (d0 == 0 && d1 == 0 && d2 == 0 && d3 == bpf_htonl(1))
        return 1;  // ::1
    if (d0 == p0 && d1 == p1 && d2 == p2 && d3 == p3)
        return 1;  // the pod's own address
    u32 uid = (u32)bpf_get_current_uid_gid();
    if (np_skip_uid.lookup(&uid))
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct np_orig6 orig = {};
    orig.ip6[0] = d0;
    orig.ip6[1] = d1;
    orig.ip6[2] = d2;
    orig.ip6[3] = d3;
    orig.port = port;
    np_by_cookie6.update(&cookie, &orig);
    ctx->user_ip6[0] = p0;
    ctx->user_ip6[1] = p1;
    ctx->user_ip6[2] = p2;
    ctx->user_ip6[3] = p3;
    ctx->user_port = bpf_htons(cfg->outbound_port);
    return 1;
}

int np_sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    // IPv4 destination (connect4, or connect6 to an IPv4-mapped address: an AF_INET6 socket
    // whose IPv4 source is local_ip4 all the same).
    struct np_orig *orig = np_by_cookie.lookup(&cookie);
    if (orig) {
        struct np_orig copy = *orig;
        u64 key = ((u64)skops->local_ip4 << 16) | (skops->local_port & 0xffff);
        np_origdst.update(&key, &copy);
        np_by_cookie.delete(&cookie);
        return 1;
    }
    if (skops->family != 10 /* AF_INET6 */)
        return 1;
    struct np_orig6 *orig6 = np_by_cookie6.lookup(&cookie);
    if (!orig6)
        return 1;
    struct np_orig6 copy6 = *orig6;
    struct np_key6 key6 = {};
    // One 4-byte load per word: the verifier refuses the 8-byte loads clang would merge them
    // into (sock_ops context fields are u32).
    key6.ip6[0] = *(volatile u32 *)&skops->local_ip6[0];
    key6.ip6[1] = *(volatile u32 *)&skops->local_ip6[1];
    key6.ip6[2] = *(volatile u32 *)&skops->local_ip6[2];
    key6.ip6[3] = *(volatile u32 *)&skops->local_ip6[3];
    key6.port = skops->local_port;
    np_origdst6.update(&key6, &copy6);
    np_by_cookie6.delete(&cookie);
    return 1;
}

static __always_inline int np_parse_syn(struct __sk_buff *skb, struct iphdr **ipp,
                                        struct tcphdr **tcpp) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
        return 0;
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > end)
        return 0;
    if (!tcp->syn || tcp->ack)
        return 0;
    *ipp = ip;
    *tcpp = tcp;
    return 1;
}

// A SYN to the listener found with ``tuple`` (its destination port replaced by the inbound
// port): assigned to it, or dropped when the agent does not listen (fail closed).
static __always_inline int np_assign(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
                                     u32 len) {
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, tuple, len, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT;  // the agent is not listening: fail closed
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err == 0 ? TC_ACT_OK : TC_ACT_SHOT;
}

// IPv6 inbound, only with IPv6 capture on (pod_ip6 set), as the rule modes: a SYN (TCP right
// after the fixed header; no extension headers) to any port but HBONE and the excluded ones
// goes to the agent's [::]:15006.
static __always_inline int np_ingress6(struct __sk_buff *skb, struct np_cfg *cfg) {
    if ((cfg->pod_ip6[0] | cfg->pod_ip6[1] | cfg->pod_ip6[2] | cfg->pod_ip6[3]) == 0)
        return TC_ACT_UNSPEC;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return TC_ACT_UNSPEC;
    struct ipv6hdr *ip6 = (void *)(eth + 1);
    if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    struct tcphdr *tcp = (void *)(ip6 + 1);
    if ((void *)(tcp + 1) > end || !tcp->syn || tcp->ack)
        return TC_ACT_UNSPEC;
    u16 dport = bpf_ntohs(tcp->dest);
    if (dport == cfg->hbone_port || np_skip_inbound.lookup(&dport))
        return TC_ACT_UNSPEC;
    struct bpf_sock_tuple tuple = {};
    __builtin_memcpy(tuple.ipv6.saddr, &ip6->saddr, 16);
    __builtin_memcpy(tuple.ipv6.daddr, &ip6->daddr, 16);
    tuple.ipv6.sport = tcp->source;
    tuple.ipv6.dport = bpf_htons(cfg->inbound_port);
    return np_assign(skb, &tuple, sizeof(tuple.ipv6));
}

int np_ingress(struct __sk_buff *skb) {
    struct np_cfg *cfg = np_get_cfg();
    if (!cfg || cfg->inbound_port == 0)
        return TC_ACT_UNSPEC;
    if (skb->protocol == bpf_htons(ETH_P_IPV6))
        return np_ingress6(skb, cfg);
    struct iphdr *ip;
    struct tcphdr *tcp;
    if (!np_parse_syn(skb, &ip, &tcp))
        return TC_ACT_UNSPEC;
    u16 dport = bpf_ntohs(tcp->dest);
    if (dport == cfg->hbone_port || np_skip_inbound.lookup(&dport))
        return TC_ACT_UNSPEC;
    if (cfg->probe_ip4 && ip->saddr == cfg->probe_ip4)
        return TC_ACT_UNSPEC;
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = ip->saddr;
    tuple.ipv4.daddr = ip->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = bpf_htons(cfg->inbound_port);
    return np_assign(skb, &tuple, sizeof(tuple.ipv4));
}

int np_lo_mark(struct __sk_buff *skb) {
    struct np_cfg *cfg = np_get_cfg();
    if (!cfg)
        return TC_ACT_UNSPEC;
    if ((skb->mark & cfg->mark_mask) != cfg->proxy_mark)
        return TC_ACT_UNSPEC;
    struct iphdr *ip;
    struct tcphdr *tcp;
    if (!np_parse_syn(skb, &ip, &tcp))
        return TC_ACT_UNSPEC;
    skb->mark = (skb->mark & ~cfg->mark_mask) | cfg->connmark;
    return TC_ACT_UNSPEC;
}
