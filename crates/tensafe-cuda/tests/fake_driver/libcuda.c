/* A stand-in for the CUDA driver library (libcuda.so), for testing
 * tensafe-cuda on machines without a GPU. "Device memory" is host memory the
 * test registers (fake_register). It models what the sink relies on:
 *
 *  - Asynchrony: a stream is a queue. cuMemcpyHtoDAsync only enqueues; the
 *    copy reads its source when the queue runs, which is only at a
 *    synchronization (an event or stream synchronize, a destroy). A caller
 *    that rewrites a source before waiting for its copy gets wrong data.
 *  - Ordering: cuStreamWaitEvent enqueues a wait that, when reached, first
 *    runs the other stream up to the event.
 *  - Contexts: calls that need a current context fail without one (and
 *    destroys and synchronizes here need one too, stricter than the driver).
 *  - Memory: what the test registers is device memory of device 0, or
 *    pinned host memory (which the driver also gives a device ordinal).
 *
 * It counts what tests assert on (fake_counter) and can fail the n-th call of
 * a function (fake_fail_call). Not thread-efficient: one lock around all. */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static char primary_context;
static __thread void *context_stack[8];
static __thread int context_depth; /* context_stack[depth - 1] is current */

enum { COPY, WAIT };
struct stream;
struct event {
    struct stream *stream;
    size_t upto; /* complete once the stream has run this many ops */
};
struct op {
    int kind;
    uint64_t dst;
    const void *src;
    size_t len;
    struct event *event; /* WAIT: runs event->stream up to event->upto */
    size_t event_upto;
};
struct stream {
    struct op *ops;
    size_t len, cap, done;
};
static struct stream legacy_stream; /* stream 0 */

static struct { uint64_t start; size_t size; int memory_type; } allocations[16];
static int allocation_count;

static long counters[8];
static const char *counter_names[] = {"retained", "copies_run", "no_context", "busy_destroys", "pending", "streams", "events", NULL};
enum { RETAINED, COPIES_RUN, NO_CONTEXT, BUSY_DESTROYS, PENDING, STREAMS, EVENTS };

static char fail_name[64];
static long fail_after = -1; /* fail the call when this reaches 0 */

static int failing(const char *name) {
    if (fail_after < 0 || strcmp(name, fail_name) != 0) return 0;
    return fail_after-- == 0;
}

static struct stream *S(void *handle) { return handle ? (struct stream *)handle : &legacy_stream; }

static void run_until(struct stream *s, size_t upto) {
    while (s->done < upto) {
        struct op op = s->ops[s->done++];
        counters[PENDING]--;
        if (op.kind == COPY) {
            memcpy((void *)(uintptr_t)op.dst, op.src, op.len);
            counters[COPIES_RUN]++;
        } else if (op.kind == WAIT) {
            run_until(op.event->stream, op.event_upto);
        }
    }
}

static void push(struct stream *s, struct op op) {
    if (s->len == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->ops = realloc(s->ops, s->cap * sizeof *s->ops);
    }
    s->ops[s->len++] = op;
    counters[PENDING]++;
}

static int has_context(void) {
    if (context_depth > 0 && context_stack[context_depth - 1]) return 1;
    counters[NO_CONTEXT]++;
    return 0;
}

#define LOCKED(body)                     \
    do {                                 \
        CUresult result_;                \
        pthread_mutex_lock(&lock);       \
        result_ = (body);                \
        pthread_mutex_unlock(&lock);     \
        return result_;                  \
    } while (0)

/* Test hooks. `memory_type`: 2 device memory, 1 pinned host memory. */
void fake_register(uint64_t start, size_t size, int memory_type) {
    pthread_mutex_lock(&lock);
    allocations[allocation_count].start = start;
    allocations[allocation_count].size = size;
    allocations[allocation_count].memory_type = memory_type;
    allocation_count++;
    pthread_mutex_unlock(&lock);
}

long fake_counter(const char *name) {
    long value = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; counter_names[i]; i++)
        if (strcmp(name, counter_names[i]) == 0) value = counters[i];
    pthread_mutex_unlock(&lock);
    return value;
}

void fake_fail_call(const char *name, long after) {
    pthread_mutex_lock(&lock);
    strncpy(fail_name, name, sizeof fail_name - 1);
    fail_after = after;
    pthread_mutex_unlock(&lock);
}

/* The legacy stream's queue, run: what a later synchronize of it does. */
void fake_sync_legacy(void) {
    pthread_mutex_lock(&lock);
    run_until(&legacy_stream, legacy_stream.len);
    pthread_mutex_unlock(&lock);
}

/* The driver API, the calls tensafe-cuda makes. */
CUresult cuInit(unsigned flags) {
    (void)flags;
    LOCKED((initialized = 1, SUCCESS));
}

CUresult cuDeviceGet(int *device, int ordinal) {
    if (!initialized) return NOT_INITIALIZED;
    if (ordinal != 0) return INVALID_DEVICE;
    *device = 0;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void **context, int device) {
    if (device != 0) return INVALID_DEVICE;
    *context = &primary_context;
    LOCKED((counters[RETAINED]++, SUCCESS));
}

CUresult cuDevicePrimaryCtxRelease_v2(int device) {
    if (device != 0) return INVALID_DEVICE;
    LOCKED((counters[RETAINED]--, SUCCESS));
}

CUresult cuCtxSetCurrent(void *context) {
    if (context_depth == 0) context_depth = 1;
    context_stack[context_depth - 1] = context;
    return SUCCESS;
}

CUresult cuCtxPushCurrent_v2(void *context) {
    if (context_depth == 8) return INVALID_VALUE;
    context_stack[context_depth++] = context;
    return SUCCESS;
}

CUresult cuCtxPopCurrent_v2(void **context) {
    if (context_depth == 0) return INVALID_CONTEXT;
    void *popped = context_stack[--context_depth];
    if (context) *context = popped;
    return SUCCESS;
}

CUresult cuPointerGetAttribute(void *data, int attribute, uint64_t pointer) {
    pthread_mutex_lock(&lock);
    CUresult result = INVALID_VALUE;
    for (int i = 0; i < allocation_count; i++) {
        uint64_t start = allocations[i].start;
        size_t size = allocations[i].size;
        if (pointer < start || pointer >= start + size) continue;
        result = SUCCESS;
        if (attribute == 2) *(unsigned *)data = allocations[i].memory_type; /* MEMORY_TYPE */
        else if (attribute == 9) *(int *)data = 0;            /* DEVICE_ORDINAL */
        else if (attribute == 11) *(uint64_t *)data = start;  /* RANGE_START_ADDR */
        else if (attribute == 12) *(size_t *)data = size;     /* RANGE_SIZE */
        else result = INVALID_VALUE;
    }
    pthread_mutex_unlock(&lock);
    return result;
}

/* A new stream or event, counted; only with a current context. */
static CUresult create(void **handle, size_t size, int counter) {
    pthread_mutex_lock(&lock);
    CUresult result = INVALID_CONTEXT;
    if (has_context()) {
        *handle = calloc(1, size);
        counters[counter]++;
        result = SUCCESS;
    }
    pthread_mutex_unlock(&lock);
    return result;
}

CUresult cuStreamCreate(void **stream, unsigned flags) {
    (void)flags;
    return create(stream, sizeof(struct stream), STREAMS);
}

CUresult cuStreamSynchronize(void *stream) {
    LOCKED(has_context() ? (run_until(S(stream), S(stream)->len), SUCCESS) : INVALID_CONTEXT);
}

CUresult cuStreamDestroy_v2(void *stream) {
    pthread_mutex_lock(&lock);
    if (!has_context()) {
        pthread_mutex_unlock(&lock);
        return INVALID_CONTEXT;
    }
    struct stream *s = S(stream);
    if (s->done < s->len) {
        counters[BUSY_DESTROYS]++;
        run_until(s, s->len); /* a real driver finishes the work later */
    }
    counters[STREAMS]--;
    /* Not freed: a WAIT op elsewhere may still name it. */
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}

CUresult cuEventCreate(void **event, unsigned flags) {
    (void)flags;
    return create(event, sizeof(struct event), EVENTS);
}

CUresult cuEventRecord(void *event, void *stream) {
    pthread_mutex_lock(&lock);
    CUresult result = INVALID_CONTEXT;
    if (failing("cuEventRecord")) {
        result = INVALID_HANDLE;
    } else if (has_context()) {
        struct event *e = event;
        e->stream = S(stream);
        e->upto = e->stream->len;
        result = SUCCESS;
    }
    pthread_mutex_unlock(&lock);
    return result;
}

CUresult cuEventSynchronize(void *event) {
    struct event *e = event;
    LOCKED(!has_context() ? INVALID_CONTEXT : (e->stream ? run_until(e->stream, e->upto) : (void)0, SUCCESS));
}

CUresult cuEventDestroy_v2(void *event) {
    (void)event; /* not freed: a WAIT op may still name it */
    LOCKED(has_context() ? (counters[EVENTS]--, SUCCESS) : INVALID_CONTEXT);
}

CUresult cuStreamWaitEvent(void *stream, void *event, unsigned flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    CUresult result = INVALID_CONTEXT;
    if (has_context()) {
        struct event *e = event;
        struct op op = {WAIT, 0, NULL, 0, e, e->upto};
        push(S(stream), op);
        result = SUCCESS;
    }
    pthread_mutex_unlock(&lock);
    return result;
}

CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t len, void *stream) {
    pthread_mutex_lock(&lock);
    CUresult result = INVALID_VALUE;
    if (failing("cuMemcpyHtoDAsync_v2")) {
        result = INVALID_VALUE;
    } else if (!has_context()) {
        result = INVALID_CONTEXT;
    } else {
        for (int i = 0; i < allocation_count; i++) {
            if (allocations[i].memory_type == 2 && dst >= allocations[i].start && dst + len <= allocations[i].start + allocations[i].size) {
                struct op op = {COPY, dst, src, len, NULL, 0};
                push(S(stream), op);
                result = SUCCESS;
                break;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return result;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; return SUCCESS;
    case INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; return SUCCESS;
    case INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; return SUCCESS;
    case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; return SUCCESS;
    default: return INVALID_VALUE;
    }
}

CUresult cuGetErrorString(CUresult error, const char **text) {
    const char *name;
    if (cuGetErrorName(error, &name) != SUCCESS) return INVALID_VALUE;
    *text = "reported by the fake driver";
    return SUCCESS;
}
