/* consts.h - protocol numbers, verdict helpers and the limits that user space
 * passes in with -D (l4lb/consts.py is their one home; the defaults below only
 * let an editor or a bare clang parse this file). */
#pragma once

#ifndef RING_SIZE
#define RING_SIZE 65537u
#endif
#ifndef MAX_VIPS
#define MAX_VIPS 64u
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 4097u
#endif
#ifndef CT_SIZE
#define CT_SIZE 262144u
#endif
#ifndef FLOW_HASH_SEED
#define FLOW_HASH_SEED 0x9E3779B9u
#endif
#ifndef VIP_F_NO_SPORT
#define VIP_F_NO_SPORT 1u
#define VIP_F_NO_CONNTRACK 2u
#define BACKEND_F_VALID 1u
#define FAMILY_V4 4u
#define FAMILY_V6 6u
#endif

#ifndef VIP_FILTER_BITS_LOG2
#define VIP_FILTER_BITS_LOG2 16
#endif
#define VIP_FILTER_WORDS ((1u << VIP_FILTER_BITS_LOG2) / 64)

/* A helper returns an XDP verdict to stop, or FURTHER_PROCESSING to go on. */
#define FURTHER_PROCESSING -1

#define ETH_P_IP_BE 0x0008     /* htons(ETH_P_IP) on little-endian */
#define ETH_P_IPV6_BE 0xDD86   /* htons(ETH_P_IPV6) */
#define ETH_P_8021Q_BE 0x0081  /* htons(ETH_P_8021Q) */
#define ETH_P_8021AD_BE 0xA888 /* htons(ETH_P_8021AD) */

#define PROTO_ICMP 1
#define PROTO_IPIP 4
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_IPV6 41
#define PROTO_ICMPV6 58

#define IP_DF_BE 0x0040         /* htons(0x4000) */
#define IP_FRAG_MASK_BE 0xFF3F  /* htons(0x3fff): MF flag or a fragment offset */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define OUTER_TTL 64
#define ONE_SECOND_NS 1000000000ull
#define IPV6_MIN_MTU 1280
