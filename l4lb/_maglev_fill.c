/* Maglev table fill loop (l4lb/maglev.py describes the algorithm).
 *
 * A plain C function loaded with ctypes: no Python C-API. The caller has
 * already validated the input, sorted the backends and computed each one's
 * offset, skip and quota; this file only runs the sequential fill, which is
 * the part that is too slow in Python.
 */
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define MAGLEV_EXPORT __declspec(dllexport)
#else
#define MAGLEV_EXPORT __attribute__((visibility("default")))
#endif

static uint32_t gcd_u32(uint32_t a, uint32_t b)
{
    while (b) {
        uint32_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/*
 * Fill entry[0..m-1] with backend numbers 0..n-1 (-1 where no backend has a
 * positive quota). Round after round, each backend i still below quota[i]
 * takes one turn, in order; a turn claims the next free slot of its
 * permutation perm_i[j] = (offset[i] + j * skip[i]) % m. A backend that
 * reaches its quota leaves the later rounds. The quotas must sum to at most
 * m; the caller makes them sum to exactly m (or 0 for an empty table).
 *
 * Scratch, n elements each: pos[i] holds perm_i[next_i] (stepping by skip with
 * one conditional subtraction instead of computing (offset + j * skip) % m
 * keeps every value below 2 * m, so nothing overflows); left[i] is what
 * backend i still has to take; active lists, in order, the backends still
 * below quota, compacted after every round so a round costs only the turns it
 * hands out.
 *
 * Returns 0 on success, -1 on input that would loop forever or overflow.
 */
MAGLEV_EXPORT int maglev_fill(uint32_t m, uint32_t n, const uint32_t *offset,
                              const uint32_t *skip, const uint32_t *quota,
                              int32_t *entry, uint32_t *pos, uint32_t *left,
                              uint32_t *active)
{
    uint32_t i, k, kept, nactive = 0;
    uint64_t total = 0;

    if (m < 2 || m > 0x7fffffffu)
        return -1;
    memset(entry, 0xff, (size_t)m * sizeof(*entry)); /* every entry -1 */
    for (i = 0; i < n; i++) {
        /* The probe loop below ends only if every permutation visits all m
         * slots, i.e. skip is coprime with m (always true for a prime m). */
        if (offset[i] >= m || skip[i] == 0 || skip[i] >= m || gcd_u32(skip[i], m) != 1)
            return -1;
        pos[i] = offset[i];
        left[i] = quota[i];
        total += quota[i];
        if (quota[i] > 0)
            active[nactive++] = i;
    }
    /* More turns than slots: the probe for a slot would never find one free. */
    if (total > m)
        return -1;

    while (nactive > 0) {
        for (k = 0, kept = 0; k < nactive; k++) {
            uint32_t p, s;

            i = active[k];
            p = pos[i];
            s = skip[i];
            while (entry[p] >= 0) {
                p += s;
                if (p >= m)
                    p -= m;
            }
            entry[p] = (int32_t)i;
            p += s;
            if (p >= m)
                p -= m;
            pos[i] = p;
            if (--left[i] > 0)
                active[kept++] = i;
        }
        nactive = kept;
    }
    return 0;
}
