/* Block hash -> bitmask of the workers holding the block: the prefix index's hot map.
 * router/block_map.py has the plain-dict reference (same interface) and says why this
 * exists; tests/test_block_map.py checks one against the other.
 *
 * Open addressing with linear probing, load <= 1/2, backward-shift deletion (no
 * tombstones). Entry i is tab[i * stride]: the key, then `words` mask words (bit s of the
 * mask: worker slot s). Key 0 marks an empty entry, so hash 0 keeps its mask outside the
 * table (`zero`). An entry exists iff its mask is non-zero. Home slot: Fibonacci hashing
 * of the key, so clustered keys (tests use small ints) spread too.
 *
 * `run_lengths` and `add`/`discard` take the hashes in chunks: convert a chunk of Python ints
 * and prefetch their entries, then probe them, so the cache misses of a chunk overlap
 * instead of queueing one after another as dict probes from Python do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ull
#define CHUNK 32
#define MIN_CAP 1024

typedef struct {
    PyObject_HEAD
    uint64_t *tab;
    Py_ssize_t cap;    /* entries, a power of two */
    int shift;         /* 64 - log2(cap) */
    Py_ssize_t count;  /* entries in use */
    Py_ssize_t words;  /* mask words per entry */
    uint64_t *zero;    /* the mask of hash 0 */
} BlockMap;

static inline Py_ssize_t stride(const BlockMap *m) { return 1 + m->words; }

static inline Py_ssize_t home(const BlockMap *m, uint64_t h) {
    return (Py_ssize_t)((h * GOLDEN) >> m->shift);
}

/* The entry holding h, or the empty one where h would go. h != 0. */
static inline uint64_t *probe(const BlockMap *m, uint64_t h) {
    Py_ssize_t i = home(m, h), s = stride(m);
    for (;;) {
        uint64_t *e = m->tab + i * s;
        if (e[0] == h || e[0] == 0) return e;
        i = (i + 1) & (m->cap - 1);
    }
}

static inline int is_zero(const uint64_t *w, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n; k++)
        if (w[k]) return 0;
    return 1;
}

/* Rebuild with `cap` entries of `words` mask words (to grow, or to widen the masks). */
static int resize(BlockMap *m, Py_ssize_t cap, Py_ssize_t words) {
    uint64_t *tab = PyMem_Calloc((size_t)cap * (1 + words), sizeof(uint64_t));
    uint64_t *zero = PyMem_Calloc(words, sizeof(uint64_t));
    if (!tab || !zero) {
        PyMem_Free(tab);
        PyMem_Free(zero);
        PyErr_NoMemory();
        return -1;
    }
    BlockMap old = *m;
    m->tab = tab;
    m->zero = zero;
    m->cap = cap;
    m->words = words;
    m->shift = 64;
    while (((Py_ssize_t)1 << (64 - m->shift)) < cap) m->shift--;
    if (old.zero) memcpy(zero, old.zero, old.words * sizeof(uint64_t));
    for (Py_ssize_t i = 0; old.tab && i < old.cap; i++) {
        uint64_t *src = old.tab + i * (1 + old.words);
        if (src[0]) memcpy(probe(m, src[0]), src, (1 + old.words) * sizeof(uint64_t));
    }
    PyMem_Free(old.tab);
    PyMem_Free(old.zero);
    return 0;
}

/* Empty entry e, then shift later entries of its cluster back so that every key stays
 * reachable from its home without crossing an empty entry. */
static void delete(BlockMap *m, uint64_t *e) {
    Py_ssize_t s = stride(m), mask = m->cap - 1;
    Py_ssize_t i = (e - m->tab) / s, j = i;
    for (;;) {
        j = (j + 1) & mask;
        uint64_t *f = m->tab + j * s;
        if (!f[0]) break;
        Py_ssize_t h = home(m, f[0]);
        if (i <= j ? (i < h && h <= j) : (i < h || h <= j)) continue;  /* stays */
        memcpy(m->tab + i * s, f, s * sizeof(uint64_t));
        i = j;
    }
    memset(m->tab + i * s, 0, s * sizeof(uint64_t));
    m->count--;
}

/* The mask as a Python int. */
static PyObject *to_long(const uint64_t *w, Py_ssize_t words) {
    PyObject *r = PyLong_FromUnsignedLongLong(w[words - 1]);
    for (Py_ssize_t k = words - 2; r && k >= 0; k--) {
        PyObject *sh = PyLong_FromLong(64), *lo = PyLong_FromUnsignedLongLong(w[k]);
        PyObject *up = sh && lo ? PyNumber_Lshift(r, sh) : NULL;
        Py_DECREF(r);
        r = up ? PyNumber_Or(up, lo) : NULL;
        Py_XDECREF(sh);
        Py_XDECREF(lo);
        Py_XDECREF(up);
    }
    return r;
}

/* The hash o as a uint64: an int in [0, 2**64), else -1 with TypeError / OverflowError.
 * PyLong_AsUnsignedLongLong checks the same through a generic byte loop, 4x slower (a
 * third of a lookup); the fast check uses private helpers that 3.14 no longer exports. */
static inline int as_hash(PyObject *o, uint64_t *h) {
#if PY_VERSION_HEX < 0x030E0000
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a block hash must be an int, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    if (_PyLong_Sign(o) < 0 || _PyLong_NumBits(o) > 64) {
        PyErr_SetString(PyExc_OverflowError, "a block hash must be in [0, 2**64)");
        return -1;
    }
    *h = PyLong_AsUnsignedLongLongMask(o);
    return 0;
#else
    *h = PyLong_AsUnsignedLongLong(o);
    return *h == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
#endif
}

/* Convert the hashes items[base:base + c] (Python ints) into h, prefetching their entries,
 * then prefetch the int objects of the next chunk: they arrive while the caller probes
 * this one. Returns c = min(CHUNK, n - base), or -1 on a bad hash. */
static Py_ssize_t load_chunk(const BlockMap *m, PyObject *const *items, Py_ssize_t base,
                             Py_ssize_t n, uint64_t *h) {
    Py_ssize_t c = n - base < CHUNK ? n - base : CHUNK, s = stride(m);
    if (base == 0)
        for (Py_ssize_t i = 0; i < c; i++) __builtin_prefetch(items[i]);
    for (Py_ssize_t i = 0; i < c; i++) {
        if (as_hash(items[base + i], h + i) < 0) return -1;
        __builtin_prefetch(m->tab + home(m, h[i]) * s);
    }
    for (Py_ssize_t i = base + c; i < n && i < base + 2 * c; i++) __builtin_prefetch(items[i]);
    return c;
}

static PyObject *bm_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "BlockMap() takes no arguments");
        return NULL;
    }
    BlockMap *m = (BlockMap *)type->tp_alloc(type, 0);
    if (m && resize(m, MIN_CAP, 1) < 0) Py_CLEAR(m);
    return (PyObject *)m;
}

static void bm_dealloc(BlockMap *m) {
    PyMem_Free(m->tab);
    PyMem_Free(m->zero);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t bm_len(BlockMap *m) {
    return m->count + !is_zero(m->zero, m->words);
}

/* Shared by add and discard: the hashes as a sequence, and the word and bit of slot. */
static PyObject *parse(PyObject *args, Py_ssize_t *word, uint64_t *bit) {
    PyObject *hashes;
    Py_ssize_t slot;
    if (!PyArg_ParseTuple(args, "On", &hashes, &slot)) return NULL;
    if (slot < 0) {
        PyErr_SetString(PyExc_ValueError, "slot must be >= 0");
        return NULL;
    }
    *word = slot / 64;
    *bit = 1ull << (slot % 64);
    return PySequence_Fast(hashes, "hashes must be a sequence");
}

static PyObject *bm_add(BlockMap *m, PyObject *args) {
    Py_ssize_t word;
    uint64_t bit, h[CHUNK];
    PyObject *seq = parse(args, &word, &bit);
    if (!seq) return NULL;
    if (word >= m->words && resize(m, m->cap, word + 1) < 0) goto fail;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t base = 0, c; base < n; base += c) {
        if ((c = load_chunk(m, items, base, n, h)) < 0) goto fail;
        for (Py_ssize_t i = 0; i < c; i++) {
            if (!h[i]) {
                m->zero[word] |= bit;
                continue;
            }
            uint64_t *e = probe(m, h[i]);
            if (!e[0]) {
                if (2 * (m->count + 1) > m->cap) {
                    if (resize(m, 2 * m->cap, m->words) < 0) goto fail;
                    e = probe(m, h[i]);
                }
                e[0] = h[i];
                m->count++;
            }
            e[1 + word] |= bit;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyObject *bm_discard(BlockMap *m, PyObject *args) {
    Py_ssize_t word;
    uint64_t bit, h[CHUNK];
    PyObject *seq = parse(args, &word, &bit);
    if (!seq) return NULL;
    Py_ssize_t n = word < m->words ? PySequence_Fast_GET_SIZE(seq) : 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t base = 0, c; base < n; base += c) {
        if ((c = load_chunk(m, items, base, n, h)) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < c; i++) {
            if (!h[i]) {
                m->zero[word] &= ~bit;
                continue;
            }
            uint64_t *e = probe(m, h[i]);
            if (e[0] && (e[1 + word] &= ~bit) == 0 && is_zero(e + 1, m->words)) delete(m, e);
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* live as mask words (zero-padded), widening the table's masks first if it names slots
 * above them (a worker with no blocks yet). Sets *nbits to live.bit_length(); 1 when the
 * caller's buffer of max_words is too small. live >= 0. */
static int load_live(BlockMap *m, PyObject *live, uint64_t *alive, Py_ssize_t max_words,
                     Py_ssize_t *nbits) {
    uint64_t lo = PyLong_AsUnsignedLongLong(live);
    *nbits = lo ? 64 - __builtin_clzll(lo) : 0;
    if (lo == (uint64_t)-1 && PyErr_Occurred()) {  /* over 64 bits */
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        PyObject *bits = PyObject_CallMethod(live, "bit_length", NULL);
        *nbits = bits ? PyLong_AsSsize_t(bits) : -1;
        Py_XDECREF(bits);
        if (*nbits < 0) return -1;
    }
    Py_ssize_t need = (*nbits + 63) / 64;
    if (need > m->words && resize(m, m->cap, need) < 0) return -1;
    if (m->words > max_words) return 1;
    memset(alive, 0, m->words * sizeof(uint64_t));
    if (*nbits <= 64) {
        alive[0] = lo;
        return 0;
    }
    for (Py_ssize_t k = 0; k < need; k++) {
        PyObject *sh = PyLong_FromSsize_t(64 * k), *part = sh ? PyNumber_Rshift(live, sh) : NULL;
        alive[k] = part ? PyLong_AsUnsignedLongLongMask(part) : 0;
        Py_XDECREF(sh);
        Py_XDECREF(part);
        if (!part) return -1;
    }
    return 0;
}

/* lengths[s] = i for each bit s of w (word k of a mask). */
static inline void set_lengths(Py_ssize_t *lengths, Py_ssize_t k, uint64_t w, Py_ssize_t i) {
    for (; w; w &= w - 1) lengths[64 * k + __builtin_ctzll(w)] = i;
}

/* Walk the hashes while some worker still holds an unbroken run: alive only loses bits,
 * and a worker's run length is the block where its bit left. */
static void walk(const BlockMap *m, PyObject **items, Py_ssize_t n, uint64_t *alive,
                 Py_ssize_t *lengths, int *err) {
    Py_ssize_t words = m->words;
    uint64_t h[CHUNK];
    for (Py_ssize_t base = 0, c; base < n; base += c) {
        if ((c = load_chunk(m, items, base, n, h)) < 0) {
            *err = 1;
            return;
        }
        for (Py_ssize_t i = 0; i < c; i++) {
            const uint64_t *held = m->zero;
            if (h[i]) {
                const uint64_t *e = probe(m, h[i]);
                held = e[0] ? e + 1 : NULL;
            }
            uint64_t left = 0;
            for (Py_ssize_t k = 0; k < words; k++) {
                uint64_t gone = alive[k] & ~(held ? held[k] : 0);
                set_lengths(lengths, k, gone, base + i);
                alive[k] &= ~gone;
                left |= alive[k];
            }
            if (!left) return;
        }
    }
    for (Py_ssize_t k = 0; k < words; k++) set_lengths(lengths, k, alive[k], n);
}

static PyObject *bm_run_lengths(BlockMap *m, PyObject *args) {
    PyObject *hashes, *live, *values = NULL, *seq = NULL, *out = NULL;
    uint64_t stack[4], *alive = stack;
    Py_ssize_t stack_lengths[256], *lengths = stack_lengths, nbits;
    int err = 0;
    if (!PyArg_ParseTuple(args, "OO!|O!", &hashes, &PyLong_Type, &live, &PyList_Type, &values))
        return NULL;
    int rc = load_live(m, live, stack, 4, &nbits);
    if (rc > 0) {  /* over 256 workers */
        alive = PyMem_Malloc(m->words * sizeof(uint64_t));
        lengths = PyMem_Malloc(64 * m->words * sizeof(Py_ssize_t));
        rc = alive && lengths ? load_live(m, live, alive, m->words, &nbits) : -1;
        if (!alive || !lengths) PyErr_NoMemory();
    }
    if (rc == 0 && (seq = PySequence_Fast(hashes, "hashes must be a sequence"))) {
        memset(lengths, 0, nbits * sizeof(Py_ssize_t));
        walk(m, PySequence_Fast_ITEMS(seq), PySequence_Fast_GET_SIZE(seq), alive, lengths,
             &err);
        out = err ? NULL : PyList_New(nbits);
        for (Py_ssize_t s = 0; out && s < nbits; s++) {
            PyObject *v;
            if (!values) {
                v = PyLong_FromSsize_t(lengths[s]);
            } else if (lengths[s] < PyList_GET_SIZE(values)) {
                v = PyList_GET_ITEM(values, lengths[s]);
                Py_INCREF(v);
            } else {
                v = NULL;
                PyErr_SetString(PyExc_IndexError, "values is shorter than a run");
            }
            if (!v) Py_CLEAR(out);
            else PyList_SET_ITEM(out, s, v);
        }
        Py_DECREF(seq);
    }
    if (alive != stack) PyMem_Free(alive);
    if (lengths != stack_lengths) PyMem_Free(lengths);
    return out;
}

static PyObject *bm_to_dict(BlockMap *m, PyObject *unused) {
    PyObject *out = PyDict_New();
    if (out && !is_zero(m->zero, m->words)) {
        PyObject *k = PyLong_FromLong(0), *v = to_long(m->zero, m->words);
        if (!k || !v || PyDict_SetItem(out, k, v) < 0) Py_CLEAR(out);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    for (Py_ssize_t i = 0; out && i < m->cap; i++) {
        const uint64_t *e = m->tab + i * stride(m);
        if (!e[0]) continue;
        PyObject *k = PyLong_FromUnsignedLongLong(e[0]), *v = to_long(e + 1, m->words);
        if (!k || !v || PyDict_SetItem(out, k, v) < 0) Py_CLEAR(out);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    return out;
}

static PyObject *bm_check(BlockMap *m, PyObject *unused) {
    Py_ssize_t s = stride(m), count = 0;
    for (Py_ssize_t i = 0; i < m->cap; i++) {
        uint64_t *e = m->tab + i * s;
        if (!e[0]) continue;
        count++;
        if (is_zero(e + 1, m->words))
            return PyErr_Format(PyExc_AssertionError, "entry %zd has an empty mask", i);
        if (probe(m, e[0]) != e)
            return PyErr_Format(PyExc_AssertionError, "entry %zd not reachable", i);
    }
    if (count != m->count || 2 * count > m->cap)
        return PyErr_Format(PyExc_AssertionError, "%zd entries, counted %zd, capacity %zd",
                            count, m->count, m->cap);
    Py_RETURN_NONE;
}

static PyObject *bm_capacity(BlockMap *m, void *unused) { return PyLong_FromSsize_t(m->cap); }

static PyMethodDef bm_methods[] = {
    {"add", (PyCFunction)bm_add, METH_VARARGS,
     "add(hashes, slot): set bit `slot` in the mask of each hash (duplicates are fine)."},
    {"discard", (PyCFunction)bm_discard, METH_VARARGS,
     "discard(hashes, slot): clear bit `slot` for each hash; a hash left with no bit goes."},
    {"run_lengths", (PyCFunction)bm_run_lengths, METH_VARARGS,
     "run_lengths(hashes, alive, values=None) -> list: for each slot s < "
     "alive.bit_length(), how many leading hashes have bit s set (0 where alive has not); "
     "values[that] instead when values (a list) is given."},
    {"to_dict", (PyCFunction)bm_to_dict, METH_NOARGS, "{hash: mask} (tests and check())."},
    {"check", (PyCFunction)bm_check, METH_NOARGS, "Assert the table's invariants."},
    {NULL},
};

static PyGetSetDef bm_getset[] = {
    {"capacity", (getter)bm_capacity, NULL, "entries allocated (a power of two)", NULL},
    {NULL},
};

static PySequenceMethods bm_as_sequence = {.sq_length = (lenfunc)bm_len};

static PyTypeObject BlockMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._block_map.BlockMap",
    .tp_doc = "Block hash -> bitmask of worker slots (see router/block_map.py).",
    .tp_basicsize = sizeof(BlockMap),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = bm_new,
    .tp_dealloc = (destructor)bm_dealloc,
    .tp_methods = bm_methods,
    .tp_getset = bm_getset,
    .tp_as_sequence = &bm_as_sequence,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "router._block_map", NULL, -1};

PyMODINIT_FUNC PyInit__block_map(void) {
    if (PyType_Ready(&BlockMapType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddObjectRef(mod, "BlockMap", (PyObject *)&BlockMapType) < 0)
        Py_CLEAR(mod);
    return mod;
}
