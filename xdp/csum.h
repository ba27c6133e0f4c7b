/* csum.h - Internet checksums. One's-complement sums do not depend on byte
 * order, so words are summed as they lie in memory and stored back raw. */
#pragma once

static __always_inline __u16 fold_csum(__u64 sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (__u16)~sum;
}

/* Checksum of a 20-byte IPv4 header whose check field is 0. */
static __always_inline __u16 ipv4_hdr_csum(const void *hdr)
{
    const __u16 *w = hdr;
    __u64 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += w[i];
    return fold_csum(sum);
}

/* RFC 1624 incremental update: a 16-bit word of the covered data changed. */
static __always_inline __u16 csum_replace16(__u16 check, __u16 old, __u16 new)
{
    __u64 sum = (__u16)~check;
    sum += (__u16)~old;
    sum += new;
    return fold_csum(sum);
}

/* Partial sum of the 16-byte address words of an IPv6 pseudo-header. */
static __always_inline __u64 sum_words32(const __be32 *w, int n, __u64 sum)
{
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (i < n) {
            sum += w[i] & 0xffff;
            sum += w[i] >> 16;
        }
    return sum;
}
