/* conntrack.h - the connection table: an array of buckets of CT_WAYS flows,
 * one for IPv4 flows (conntrack) and one for IPv6 (conntrack6), shared by all
 * CPUs. Finding and writing an entry calls no helper: the verifier inlines an
 * array lookup, and the rest is loads, compares and stores.
 *
 * Where a flow lives: its key's hash (ct_key_hash) names two buckets; the flow goes to the first bucket while it has an empty way, else
 * to the second. The data plane never empties a way (user space deletes by
 * clearing the backend and keeping the key), so a first bucket with an empty
 * way proves that the flow is not in its second bucket: most lookups read one
 * bucket, and in it the keys first (IPv4: one cache line).
 *
 * When both buckets are full a new flow replaces the way (of the eight) whose
 * flow is least worth keeping: a way user space deleted, else the oldest flow
 * (counter ct_evict). "Oldest" by last_seen, which a TCP hit refreshes at most
 * once per CT_REFRESH_NS. A SYN never writes here (the SYN table, below), and
 * the new-flow rate limit keeps a flood of other first packets from cycling
 * through established flows.
 *
 * Two CPUs may write one way at once (a flow's packets arrive on any CPU).
 * Each entry has a sequence word: a writer claims the way by moving it from
 * even to odd with one compare-and-swap (lost: the flow gets no entry this
 * time, counter ct_busy), writes key and entry, and makes it even again. A
 * reader takes an entry only if the word was even and the same before and
 * after it copied key and entry, so a torn entry is never used: the packet
 * takes a fresh Maglev pick instead. (x86 keeps loads in order and stores in
 * order; the compiler barriers keep the program's order.) A hit's own store
 * (last_seen) is a single aligned word outside that protocol: at worst it
 * lands on a flow that has just replaced the one hit, giving it a newer stamp. */
#pragma once

#define CT_BUCKETS MAP_CONNTRACK_ENTRIES
#define CT_KEY4_WORDS (sizeof(struct flow4_key) / 4)
#define CT_KEY6_WORDS (sizeof(struct flow_key) / 4)
#define ct_barrier() asm volatile("" ::: "memory")

/* The hash that names a flow's buckets: FNV-1a over the key's 32-bit words,
 * then murmur's finalizer (one multiply a word: every established packet
 * computes it; l4lb/conntrack.py computes the same). */
static __always_inline __u32 ct_key_hash(const __u32 *k, __u32 words)
{
    __u32 h = 0x811c9dc5u;

#pragma unroll
    for (int i = 0; i < CT_KEY6_WORDS; i++)
        if (i < words)
            h = (h ^ k[i]) * 0x01000193u;
    return murmur_final(h, words);
}

/* The two buckets of a flow hash: (h * buckets) >> 32, for the second bucket
 * after a murmur-style mix with CT_SEED2 (l4lb/conntrack.py computes the same). */
static __always_inline __u32 ct_bucket1(__u32 h)
{
    return ((__u64)h * CT_BUCKETS) >> 32;
}

static __always_inline __u32 ct_bucket2(__u32 h)
{
    h ^= CT_SEED2;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return ((__u64)h * CT_BUCKETS) >> 32;
}

/* ct_bucket(v6, i), bucket i of the IPv4 or the IPv6 table, is balancer.c's:
 * bcc turns map.lookup() into a map access only in the main file. */

/* A bucket seen as words: `words` per key (4 or 10); a way is the key, then
 * its entry (and for IPv4 the padding to a cache line). */
static __always_inline __u32 *ct_key_at(void *b, __u32 words, int w)
{
    __u32 way = words == CT_KEY4_WORDS ? sizeof(struct ct_way4) : sizeof(struct ct_way6);

    return (__u32 *)((char *)b + w * way);
}

static __always_inline struct ct_entry *ct_entry_at(void *b, __u32 words, int w)
{
    return (struct ct_entry *)(ct_key_at(b, words, w) + words);
}

static __always_inline int ct_key_eq(const __u32 *a, const __u32 *k, __u32 words)
{
    __u32 diff = 0;

#pragma unroll
    for (int i = 0; i < CT_KEY6_WORDS; i++)
        if (i < words)
            diff |= a[i] ^ k[i];
    return !diff;
}

/* proto (and for IPv6 the family) lie in a key's last word: 0 only in an empty way */
static __always_inline int ct_key_empty(const __u32 *a, __u32 words)
{
    return a[words - 1] == 0;
}

/* The flow's way in bucket b: its index, or -1 with *empty set to the first
 * empty way + 1 when the bucket has one (ways fill in order: nothing follows
 * the first empty one). */
static __always_inline int ct_scan(void *b, const __u32 *k, __u32 words, int *empty)
{
#pragma unroll
    for (int w = 0; w < CT_WAYS; w++) {
        __u32 *a = ct_key_at(b, words, w);

        if (ct_key_empty(a, words)) {
            *empty = w + 1;
            return -1;
        }
        if (ct_key_eq(a, k, words))
            return w;
    }
    return -1;
}

/* A stable copy of way w's entry if it still holds flow k: 0, or -1. */
static __always_inline int ct_read(void *b, const __u32 *k, __u32 words, int w, struct ct_entry *out)
{
    struct ct_entry *e = ct_entry_at(b, words, w);
    __u32 seq = *(volatile __u32 *)&e->seq;

    if (seq & 1)
        return -1;
    ct_barrier();
    *out = *e;
    if (!ct_key_eq(ct_key_at(b, words, w), k, words))
        return -1;
    ct_barrier();
    if (*(volatile __u32 *)&e->seq != seq || !out->backend)
        return -1;
    return 0;
}

/* Flow k's entry: a pointer to it in the table (for the hit's own stores) and
 * a stable copy in *out; NULL when the flow has none. */
static __always_inline struct ct_entry *ct_find(int v6, const __u32 *k, __u32 h, struct ct_entry *out)
{
    __u32 words = v6 ? CT_KEY6_WORDS : CT_KEY4_WORDS;
    void *b = ct_bucket(v6, ct_bucket1(h));
    int w, empty = 0;

    if (!b)
        return NULL;
    w = ct_scan(b, k, words, &empty);
    if (w < 0) {
        if (empty)
            return NULL; /* the first bucket has room: the flow was never moved on */
        b = ct_bucket(v6, ct_bucket2(h));
        if (!b)
            return NULL;
        w = ct_scan(b, k, words, &empty);
        if (w < 0)
            return NULL;
    }
    if (ct_read(b, k, words, w, out))
        return NULL;
    return ct_entry_at(b, words, w);
}

/* How much a way is worth keeping when both buckets are full: lowest goes. */
static __always_inline __u64 ct_keep_score(const struct ct_entry *e)
{
    if (!e->backend)
        return 0; /* deleted by user space */
    return e->last_seen;
}

/* Bucket bk's way least worth keeping, if lower than *best: it becomes *b, *w. */
static __always_inline void ct_least_worth(void *bk, __u32 words, __u64 *best, void **b, int *w)
{
#pragma unroll
    for (int j = 0; j < CT_WAYS; j++) {
        __u64 s = ct_keep_score(ct_entry_at(bk, words, j));

        if (s < *best) {
            *best = s;
            *b = bk;
            *w = j;
        }
    }
}

/* Writes flow k and its entry into a way this CPU has claimed (its sequence
 * word odd), then releases it with sequence word `seq` (even). */
static __always_inline void ct_store(__u32 *key, struct ct_entry *e, const __u32 *k, __u32 words,
                                     const struct ct_entry *fresh, __u32 seq)
{
#pragma unroll
    for (int j = 0; j < CT_KEY6_WORDS; j++)
        if (j < words)
            key[j] = k[j];
    e->backend = fresh->backend;
    e->generation = fresh->generation;
    e->vip_id = fresh->vip_id;
    e->flags = fresh->flags;
    e->vip_gen = fresh->vip_gen;
    e->hash = fresh->hash;
    e->last_seen = fresh->last_seen;
    ct_barrier();
    *(volatile __u32 *)&e->seq = seq;
}

/* Writes flow k's entry: over its own way, in the first empty way of its
 * first then second bucket, or over the way least worth keeping. Returns 0
 * when written; -1 when another CPU held the way (ct_busy). */
static __always_inline int ct_write(int v6, const __u32 *k, __u32 h, const struct ct_entry *fresh,
                                    struct global_stats *gs)
{
    __u32 words = v6 ? CT_KEY6_WORDS : CT_KEY4_WORDS;
    void *b1 = ct_bucket(v6, ct_bucket1(h));
    void *b2 = ct_bucket(v6, ct_bucket2(h));
    void *b = NULL;
    int w = -1, evict = 0, empty = 0, was_empty = 0;
    struct ct_entry *e;
    __u32 *key;
    __u64 old, *word;

    if (!b1 || !b2)
        return -1;
    /* the flow's own way, else the first empty way (ct_scan found it), in the
     * first bucket, then in the second */
    b = b1;
    w = ct_scan(b1, k, words, &empty);
    if (w < 0 && !empty) {
        b = b2;
        w = ct_scan(b2, k, words, &empty);
    }
    if (w < 0 && empty) {
        was_empty = 1;
        w = empty - 1;
    } else if (w < 0) {
        /* both full: the way least worth keeping of the eight */
        __u64 best = ~0ull;

        ct_least_worth(b1, words, &best, &b, &w);
        ct_least_worth(b2, words, &best, &b, &w);
        evict = best != 0;
    }
    if (w < 0 || w >= CT_WAYS || !b)
        return -1;
    e = ct_entry_at(b, words, w);
    key = ct_key_at(b, words, w);
    /* claim: seq even -> odd, in one compare-and-swap of the word it shares with
     * hash; the way must still be empty (or the flow's) after the sequence word
     * was read, or another CPU filled it since it was chosen */
    word = (__u64 *)&e->seq;
    old = *(volatile __u64 *)word;
    ct_barrier();
    if ((old & 1) || (was_empty && !ct_key_empty(key, words)) ||
        (!was_empty && !evict && !ct_key_eq(key, k, words)) ||
        __sync_val_compare_and_swap(word, old, old + 1) != old) {
        gs->ct_busy++;
        return -1;
    }
    ct_store(key, e, k, words, fresh, (__u32)old + 2);
    if (evict)
        gs->ct_evict++;
    return 0;
}

/* The SYN table. A connection table of a production size is far larger than
 * the CPU's caches, so writing a new flow's entry into its bucket waits for
 * memory, and a SYN flood would write over established flows. A SYN's entry
 * goes instead into the SYN table: CT_SYN_SLOTS slots of one way each, slot =
 * flow hash mod CT_SYN_SLOTS, small enough to stay in cache. A later SYN whose
 * flow has the same slot writes over it (ct_syn_evict): that flow's next
 * packet then finds no entry and takes a fresh pick, as after a restart.
 *
 * Every packet that is not a SYN looks in the flow's slot first: an entry
 * there is newer than any in the connection table (a SYN re-picks). Found
 * and still valid, it moves into the connection table (ct_write,
 * ct_promote), and its slot is emptied (an ICMP error about the flow uses it
 * and moves nothing); found stale, its slot is emptied and
 * the packet takes a fresh pick. The slot's sequence word guards it as a
 * way's guards the way. ct_syn_slot(v6, fh) is balancer.c's. */

/* Flow k's entry in slot s: a stable copy in *out and the sequence word it
 * was read under in *seq; 0, or -1 when the slot holds no entry of k. */
static __always_inline int ct_syn_find(void *s, const __u32 *k, __u32 words, struct ct_entry *out,
                                       __u32 *seq)
{
    if (ct_read(s, k, words, 0, out))
        return -1;
    *seq = out->seq;
    return 0;
}

/* Empties slot s if it still holds what was read under `seq`, and says so
 * in its byte `used` (written while the slot is claimed, so that the byte and
 * the slot change in the same order for every CPU). */
static __always_inline void ct_syn_clear(void *s, __u32 words, __u32 seq, __u8 *used)
{
    struct ct_entry *e = ct_entry_at(s, words, 0);
    __u64 *word = (__u64 *)&e->seq;
    __u64 old = *(volatile __u64 *)word;

    if ((__u32)old != seq || __sync_val_compare_and_swap(word, old, old + 1) != old)
        return; /* rewritten since, or being rewritten: that write stands */
    ct_key_at(s, words, 0)[words - 1] = 0;
    e->backend = 0;
    *(volatile __u8 *)used = 0;
    ct_barrier();
    *(volatile __u32 *)&e->seq = seq + 2;
}

/* Writes a SYN's entry into slot s, over whatever the slot held. Returns 0,
 * or -1 when another CPU was writing the slot (ct_busy). */
static __always_inline int ct_syn_write(void *s, const __u32 *k, __u32 words,
                                        const struct ct_entry *fresh, struct global_stats *gs,
                                        __u8 *used)
{
    struct ct_entry *e = ct_entry_at(s, words, 0);
    __u32 *key = ct_key_at(s, words, 0);
    __u64 *word = (__u64 *)&e->seq;
    __u64 old = *(volatile __u64 *)word;
    int other;

    ct_barrier();
    if ((old & 1) || __sync_val_compare_and_swap(word, old, old + 1) != old) {
        gs->ct_busy++;
        return -1;
    }
    other = e->backend && !ct_key_eq(key, k, words);
    *(volatile __u8 *)used = 1;
    ct_store(key, e, k, words, fresh, (__u32)old + 2);
    if (other)
        gs->ct_syn_evict++;
    return 0;
}
