/* Maglev table fill loop (l4lb/maglev.py describes the algorithm).
 *
 * A plain C function loaded with ctypes: no Python C-API. The caller has
 * already validated the input, sorted the backends and computed each one's
 * offset and skip; this file only runs the sequential fill, which is the part
 * that is too slow in Python.
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
 * positive weight). Round after round, backend i takes weight[i] turns; each
 * turn claims the next free slot of its permutation
 * perm_i[j] = (offset[i] + j * skip[i]) % m.
 *
 * pos (n elements, scratch) holds perm_i[next_i]: stepping by skip with one
 * conditional subtraction instead of computing (offset + j * skip) % m keeps
 * every value below 2 * m, so nothing overflows.
 *
 * Returns 0 on success, -1 on input that would loop forever or overflow.
 */
MAGLEV_EXPORT int maglev_fill(uint32_t m, uint32_t n, const uint32_t *offset,
                              const uint32_t *skip, const uint32_t *weight,
                              int32_t *entry, uint32_t *pos)
{
    uint32_t i, t, filled = 0;
    uint64_t turns = 0;

    if (m < 2 || m > 0x7fffffffu)
        return -1;
    memset(entry, 0xff, (size_t)m * sizeof(*entry)); /* every entry -1 */
    for (i = 0; i < n; i++) {
        /* The probe loop below ends only if every permutation visits all m
         * slots, i.e. skip is coprime with m (always true for a prime m). */
        if (offset[i] >= m || skip[i] == 0 || skip[i] >= m || gcd_u32(skip[i], m) != 1)
            return -1;
        pos[i] = offset[i];
        turns += weight[i];
    }
    if (turns == 0)
        return 0;

    for (;;) {
        for (i = 0; i < n; i++) {
            uint32_t p = pos[i], s = skip[i], w = weight[i];

            for (t = 0; t < w; t++) {
                while (entry[p] >= 0) {
                    p += s;
                    if (p >= m)
                        p -= m;
                }
                entry[p] = (int32_t)i;
                p += s;
                if (p >= m)
                    p -= m;
                if (++filled == m)
                    return 0;
            }
            pos[i] = p;
        }
    }
}
