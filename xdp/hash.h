/* hash.h - the flow hash: MurmurHash3 (x86, 32 bit) over the flow's bytes
 * src | dst | sport | dport | proto,0,0,0, with IPv4 addresses as 4 bytes and
 * IPv6 as 16. Python reproduces it with mmh3.hash(bytes, FLOW_HASH_SEED) to
 * predict the backend of any flow (l4lb/flowhash.py). */
#pragma once

static __always_inline __u32 hash_rotl(__u32 x, __u32 r)
{
    return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 murmur_block(__u32 h, __u32 k)
{
    k *= 0xcc9e2d51u;
    k = hash_rotl(k, 15);
    k *= 0x1b873593u;
    h ^= k;
    h = hash_rotl(h, 13);
    return h * 5 + 0xe6546b64u;
}

static __always_inline __u32 murmur_final(__u32 h, __u32 len)
{
    h ^= len;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* The ports and protocol are passed separately: a VIP's flags may hash with 0 instead. */
static __always_inline __u32 flow_hash(const struct flow_key *f, __be16 sport, __be16 dport, __u8 proto)
{
    __u32 h = FLOW_HASH_SEED;
    __u32 len;

    if (f->family == FAMILY_V4) {
        h = murmur_block(h, f->src[0]);
        h = murmur_block(h, f->dst[0]);
        len = 16;
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++)
            h = murmur_block(h, f->src[i]);
#pragma unroll
        for (int i = 0; i < 4; i++)
            h = murmur_block(h, f->dst[i]);
        len = 40;
    }
    /* the two ports as they lie in memory, read as one little-endian word */
    h = murmur_block(h, (__u32)sport | ((__u32)dport << 16));
    h = murmur_block(h, proto);
    return murmur_final(h, len);
}

/* The hash that picks a new flow's backend on a VIP with these flags:
 * VIP_F_CLIENT_AFFINITY hashes the addresses alone (ports and protocol 0),
 * VIP_F_NO_SPORT the flow with source port 0. */
static __always_inline __u32 vip_flow_hash(const struct flow_key *f, __u32 flags)
{
    if (flags & VIP_F_CLIENT_AFFINITY)
        return flow_hash(f, 0, 0, 0);
    return flow_hash(f, (flags & VIP_F_NO_SPORT) ? 0 : f->sport, f->dport, f->proto);
}

/* Ring slot of a flow: (hash * RING_SIZE) >> 32, a multiply instead of a
 * division, and a result that the verifier can see is below RING_SIZE. */
static __always_inline __u32 ring_slot(__u32 hash)
{
    return ((__u64)hash * RING_SIZE) >> 32;
}

/* Bit of an address in the VIP filter: the address words folded and
 * multiplied (Fibonacci hashing); l4lb/flowhash.py computes the same. */
static __always_inline __u32 vip_filter_bit(const __be32 *addr, __u8 family)
{
    __u32 x = addr[0];

    if (family == FAMILY_V6)
        x ^= addr[1] ^ addr[2] ^ addr[3];
    return (x * VIP_FILTER_MULT) >> (32 - VIP_FILTER_BITS_LOG2);
}
