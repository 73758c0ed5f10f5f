// Hypura's custom ggml buffer type ("Hypura_Stream").
//
// This is the only C file in Hypura. It exists because a ggml buffer type is a
// vtable of C function pointers declared in ggml's private ggml-backend-impl.h.
//
// What the buffer type does:
//   * alloc_buffer reserves address space only: mmap(MAP_NORESERVE), nothing is
//     committed until a page is written. Tensors placed here cost no RAM at load.
//   * init_tensor reports every tensor (tensor pointer, name, data pointer,
//     byte size) to Rust through a callback. Rust decides later where the data
//     of each tensor really lives (a pool slot filled by the I/O engine) and
//     re-points `tensor->data` itself.
//   * optionally (hypura_buft_set_hide_names), init_tensor hides the tensor's
//     name from llama.cpp's loader so that the loader treats it as absent and
//     never reads its bytes; hypura_buft_restore_names puts the names back.
//   * set_tensor / memset_tensor / clear are no-ops: the data is streamed by
//     Hypura, never written through ggml.
//   * is_host is true: the CPU backend computes directly on the slots.

#define _GNU_SOURCE 1

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ggml-backend-impl.h"
#include "ggml.h"

// Called from init_tensor for every (non-view) tensor placed in the buffer type.
// The Rust side (hypura-sys/src/lib.rs) declares the same signature.
typedef void (*hypura_tensor_cb)(void * user, struct ggml_tensor * tensor, const char * name,
                                 void * data, size_t nbytes);

#ifndef MAP_NORESERVE
#define MAP_NORESERVE 0  /* not on every platform; reservation is the default there */
#endif

#define HYPURA_HIDDEN_PREFIX '\x01'

typedef struct hypura_buft_ctx {
    char name[64];
    hypura_tensor_cb cb;
    void * user;
    int hide_names;
    size_t reserved_bytes;  // address space reserved by live buffers
    size_t n_buffers;       // live buffers
} hypura_buft_ctx;

typedef struct hypura_buffer_ctx {
    void * base;
    size_t size;  // mapped length (>= 1 page)
    hypura_buft_ctx * owner;
} hypura_buffer_ctx;

static const size_t HYPURA_PAGE = 4096;

// ---------------------------------------------------------------- buffer ----

static void hypura_buffer_free(ggml_backend_buffer_t buffer) {
    hypura_buffer_ctx * ctx = (hypura_buffer_ctx *) buffer->context;
    if (ctx->base != NULL) {
        munmap(ctx->base, ctx->size);
    }
    ctx->owner->reserved_bytes -= ctx->size;
    ctx->owner->n_buffers -= 1;
    free(ctx);
}

static void * hypura_buffer_get_base(ggml_backend_buffer_t buffer) {
    hypura_buffer_ctx * ctx = (hypura_buffer_ctx *) buffer->context;
    return ctx->base;
}

static enum ggml_status hypura_buffer_init_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor) {
    hypura_buffer_ctx * ctx = (hypura_buffer_ctx *) buffer->context;
    hypura_buft_ctx * owner = ctx->owner;
    if (tensor->view_src != NULL) {
        // Views share their source's data; nothing to report.
        return GGML_STATUS_SUCCESS;
    }
    if (owner->cb != NULL) {
        owner->cb(owner->user, tensor, tensor->name, tensor->data, ggml_nbytes(tensor));
    }
    if (owner->hide_names && tensor->name[0] != HYPURA_HIDDEN_PREFIX && tensor->name[0] != '\0') {
        // Shift the name right by one and put a marker in front: llama.cpp's
        // loader looks weights up by name and skips tensors it cannot find.
        size_t n = strnlen(tensor->name, GGML_MAX_NAME - 1);
        if (n + 1 >= GGML_MAX_NAME) {
            n = GGML_MAX_NAME - 2;  // drop the last char; restored from Rust's copy
        }
        memmove(tensor->name + 1, tensor->name, n);
        tensor->name[0] = HYPURA_HIDDEN_PREFIX;
        tensor->name[n + 1] = '\0';
    }
    return GGML_STATUS_SUCCESS;
}

static void hypura_buffer_memset_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor,
                                        uint8_t value, size_t offset, size_t size) {
    (void) buffer; (void) tensor; (void) value; (void) offset; (void) size;
}

static void hypura_buffer_set_tensor(ggml_backend_buffer_t buffer, struct ggml_tensor * tensor,
                                     const void * data, size_t offset, size_t size) {
    (void) buffer; (void) tensor; (void) data; (void) offset; (void) size;
}

static void hypura_buffer_get_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor * tensor,
                                     void * data, size_t offset, size_t size) {
    (void) buffer;
    // The data pointer is whatever Hypura made it (reserved zero pages, or a slot).
    memcpy(data, (const char *) tensor->data + offset, size);
}

static bool hypura_buffer_cpy_tensor(ggml_backend_buffer_t buffer, const struct ggml_tensor * src,
                                     struct ggml_tensor * dst) {
    (void) buffer; (void) src; (void) dst;
    return false;
}

static void hypura_buffer_clear(ggml_backend_buffer_t buffer, uint8_t value) {
    (void) buffer; (void) value;
}

static const struct ggml_backend_buffer_i hypura_buffer_iface = {
    /* .free_buffer   = */ hypura_buffer_free,
    /* .get_base      = */ hypura_buffer_get_base,
    /* .init_tensor   = */ hypura_buffer_init_tensor,
    /* .memset_tensor = */ hypura_buffer_memset_tensor,
    /* .set_tensor    = */ hypura_buffer_set_tensor,
    /* .get_tensor    = */ hypura_buffer_get_tensor,
    /* .set_tensor_2d = */ NULL,
    /* .get_tensor_2d = */ NULL,
    /* .cpy_tensor    = */ hypura_buffer_cpy_tensor,
    /* .clear         = */ hypura_buffer_clear,
    /* .reset         = */ NULL,
};

// ----------------------------------------------------------- buffer type ----

static const char * hypura_buft_get_name(ggml_backend_buffer_type_t buft) {
    hypura_buft_ctx * ctx = (hypura_buft_ctx *) buft->context;
    return ctx->name;
}

static ggml_backend_buffer_t hypura_buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size) {
    hypura_buft_ctx * owner = (hypura_buft_ctx *) buft->context;
    size_t len = size == 0 ? HYPURA_PAGE : (size + HYPURA_PAGE - 1) & ~(HYPURA_PAGE - 1);
    // Reserved, not committed: untouched pages cost no RAM (reads see zero pages).
    void * base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        return NULL;
    }
    hypura_buffer_ctx * ctx = (hypura_buffer_ctx *) calloc(1, sizeof(hypura_buffer_ctx));
    if (ctx == NULL) {
        munmap(base, len);
        return NULL;
    }
    ctx->base = base;
    ctx->size = len;
    ctx->owner = owner;
    owner->reserved_bytes += len;
    owner->n_buffers += 1;
    return ggml_backend_buffer_init(buft, hypura_buffer_iface, ctx, size);
}

static size_t hypura_buft_get_alignment(ggml_backend_buffer_type_t buft) {
    (void) buft;
    return 64;
}

static bool hypura_buft_is_host(ggml_backend_buffer_type_t buft) {
    (void) buft;
    return true;
}

static const struct ggml_backend_buffer_type_i hypura_buft_iface = {
    /* .get_name         = */ hypura_buft_get_name,
    /* .alloc_buffer     = */ hypura_buft_alloc_buffer,
    /* .alloc_buffer_n   = */ NULL,
    /* .get_alignment    = */ hypura_buft_get_alignment,
    /* .get_max_size     = */ NULL,
    /* .get_alloc_size   = */ NULL,
    /* .get_alloc_size_n = */ NULL,
    /* .is_host          = */ hypura_buft_is_host,
};

ggml_backend_buffer_type_t hypura_buft_new(const char * name, ggml_backend_dev_t device,
                                           hypura_tensor_cb cb, void * user) {
    hypura_buft_ctx * ctx = (hypura_buft_ctx *) calloc(1, sizeof(hypura_buft_ctx));
    struct ggml_backend_buffer_type * buft =
        (struct ggml_backend_buffer_type *) calloc(1, sizeof(struct ggml_backend_buffer_type));
    if (ctx == NULL || buft == NULL) {
        free(ctx);
        free(buft);
        return NULL;
    }
    strncpy(ctx->name, name != NULL ? name : "Hypura_Stream", sizeof(ctx->name) - 1);
    ctx->cb = cb;
    ctx->user = user;
    buft->iface = hypura_buft_iface;
    buft->device = device;
    buft->context = ctx;
    return buft;
}

void hypura_buft_set_hide_names(ggml_backend_buffer_type_t buft, int hide) {
    ((hypura_buft_ctx *) buft->context)->hide_names = hide;
}

size_t hypura_buft_reserved_bytes(ggml_backend_buffer_type_t buft) {
    return ((hypura_buft_ctx *) buft->context)->reserved_bytes;
}

size_t hypura_buft_live_buffers(ggml_backend_buffer_type_t buft) {
    return ((hypura_buft_ctx *) buft->context)->n_buffers;
}

int hypura_buft_is_ours(ggml_backend_buffer_type_t buft) {
    return buft != NULL && buft->iface.get_name == hypura_buft_get_name;
}

void hypura_buft_free(ggml_backend_buffer_type_t buft) {
    if (buft == NULL) {
        return;
    }
    free(buft->context);
    free(buft);
}

int hypura_tensor_is_hidden(const struct ggml_tensor * tensor) {
    return tensor->name[0] == HYPURA_HIDDEN_PREFIX;
}

void hypura_tensor_set_name(struct ggml_tensor * tensor, const char * name) {
    ggml_set_name(tensor, name);
}

// Whether the device implements buffer_from_host_ptr at all. The public
// ggml_backend_dev_buffer_from_host_ptr calls the pointer unchecked (CUDA and
// HIP leave it NULL), and a device's caps flag may say false although it is
// implemented (ggml-vulkan): callers probe with a real import only when this
// is true.
int hypura_dev_has_host_ptr_import(ggml_backend_dev_t dev) {
    return dev != NULL && dev->iface.buffer_from_host_ptr != NULL;
}



// ------------------------------------------------ dynamic CPU backend ----
//
// Only with the `dynamic-backends` feature (GGML_BACKEND_DL, HYPURA_CPU_DL
// defined by build.rs): the CPU backend is then a library loaded at run time
// (one of several CPU variants), so the `ggml_cpu_has_*` queries the profiler
// links against exist in no linked library. These answer them from the loaded
// CPU backend's feature list, i.e. the variant ggml picked for this machine.
#ifdef HYPURA_CPU_DL

static int hypura_cpu_feature(const char * name) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
    if (reg == NULL) {
        return 0;
    }
    ggml_backend_get_features_t get =
        (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
    if (get == NULL) {
        return 0;
    }
    for (struct ggml_backend_feature * f = get(reg); f != NULL && f->name != NULL; f++) {
        if (strcmp(f->name, name) == 0) {
            return f->value != NULL && strcmp(f->value, "0") != 0;
        }
    }
    return 0;
}

#define HYPURA_CPU_HAS(fn, feat) \
    int ggml_cpu_has_##fn(void);  \
    int ggml_cpu_has_##fn(void) { return hypura_cpu_feature(feat); }

HYPURA_CPU_HAS(sse3, "SSE3")
HYPURA_CPU_HAS(ssse3, "SSSE3")
HYPURA_CPU_HAS(avx, "AVX")
HYPURA_CPU_HAS(avx_vnni, "AVX_VNNI")
HYPURA_CPU_HAS(avx2, "AVX2")
HYPURA_CPU_HAS(bmi2, "BMI2")
HYPURA_CPU_HAS(f16c, "F16C")
HYPURA_CPU_HAS(fma, "FMA")
HYPURA_CPU_HAS(avx512, "AVX512")
HYPURA_CPU_HAS(avx512_vbmi, "AVX512_VBMI")
HYPURA_CPU_HAS(avx512_vnni, "AVX512_VNNI")
HYPURA_CPU_HAS(avx512_bf16, "AVX512_BF16")
HYPURA_CPU_HAS(amx_int8, "AMX_INT8")
HYPURA_CPU_HAS(neon, "NEON")
HYPURA_CPU_HAS(arm_fma, "ARM_FMA")
HYPURA_CPU_HAS(fp16_va, "FP16_VA")
HYPURA_CPU_HAS(dotprod, "DOTPROD")
HYPURA_CPU_HAS(matmul_int8, "MATMUL_INT8")
HYPURA_CPU_HAS(sve, "SVE")
HYPURA_CPU_HAS(sme, "SME")

#endif  // HYPURA_CPU_DL
