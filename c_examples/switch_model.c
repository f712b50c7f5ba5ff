/*
 * switch_model.c: libpipeswitch used the way a C inference server uses it.
 *
 *   switch_model STORE_NAME MODEL_FILE.safetensors
 *
 * 1. creates a host model store in shared memory and ingests a safetensors
 *    model into it (layers from the tensor-name prefixes);
 * 2. plans the layer groups with the optimal planner, from the measured H2D
 *    bandwidth and per-copy overhead (execution times here: one microsecond
 *    per 64 KiB, standing in for times a real worker measures);
 * 3. allocates a region of a device arena and starts the pipelined switch;
 *    a worker stream waits for each group on the GPU, not on the host;
 * 4. reads the region back and checks it byte for byte against the store.
 *
 * Steps 1-2 run anywhere; on a machine without a CUDA driver the program
 * says so after step 2 and exits 0. Every call's status is checked.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeswitch.h"

#define CHECK(call)                                                            \
  do {                                                                         \
    ps_status st_ = (call);                                                    \
    if (st_ != PS_OK) {                                                        \
      fprintf(stderr, "%s failed: %s (%u): %s\n", #call, ps_status_str(st_),   \
              (unsigned)st_, ps_last_error_message());                         \
      goto fail;                                                               \
    }                                                                          \
  } while (0)

static unsigned long long fnv1a(const unsigned char *p, size_t n) {
  unsigned long long h = 0xcbf29ce484222325ULL;
  size_t i;
  for (i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

int main(int argc, char **argv) {
  const char *store_name, *path, *model = "model";
  ps_store *store = NULL;
  ps_arena *arena = NULL;
  ps_switch *sw = NULL;
  ps_model_info info;
  size_t i, n_groups = 0, *starts = NULL;
  double *transfer_ms = NULL, *exec_ms = NULL, bw = 25.0, overhead = 0.01;
  double makespan = 0.0, copy_ms = 0.0;
  unsigned char *from_store = NULL, *from_arena = NULL;
  uint64_t region = 0;
  ps_status st;
  int rc = 1;

  if (argc != 3) {
    fprintf(stderr, "usage: %s STORE_NAME MODEL_FILE.safetensors\n", argv[0]);
    return 2;
  }
  store_name = argv[1];
  path = argv[2];
  if (ps_version_number() != PS_VERSION_NUMBER) {
    fprintf(stderr, "header %d and library %u disagree\n", PS_VERSION_NUMBER,
            (unsigned)ps_version_number());
    return 1;
  }
  printf("libpipeswitch %s\n", ps_version_string());

  /* 1. The store, and the model in it. */
  CHECK(ps_store_create(store_name, 64u << 20, 0, &store));
  CHECK(ps_store_add_safetensors(store, model, path, NULL, 0));
  CHECK(ps_store_model_info(store, model, &info));
  printf("model: %llu bytes, %zu layers, %zu tensors\n",
         (unsigned long long)info.bytes, info.n_layers, info.n_tensors);
  for (i = 0; i < info.n_layers; i++) {
    ps_layer_info l;
    char name[256];
    CHECK(ps_store_layer_info(store, model, i, &l, name, sizeof name));
    printf("  layer %zu %s: %zu tensors, %llu bytes at %llu\n", i, name,
           l.n_tensors, (unsigned long long)l.bytes,
           (unsigned long long)l.offset);
  }

  /* Bad input gets a status and a message, not a crash. */
  st = ps_store_add_safetensors(store, model, path, NULL, 0);
  printf("adding it twice: %s\n", ps_status_str(st));
  if (st != PS_ERR_ALREADY_EXISTS)
    goto fail;

  /* 2. The plan, from measured numbers where a GPU is present. */
  st = ps_measure_h2d(0, 64u << 20, &bw, &overhead);
  if (st != PS_OK && st != PS_ERR_NO_DRIVER) {
    fprintf(stderr, "ps_measure_h2d: %s\n", ps_last_error_message());
    goto fail;
  }
  transfer_ms = calloc(info.n_layers, sizeof *transfer_ms);
  exec_ms = calloc(info.n_layers, sizeof *exec_ms);
  starts = calloc(info.n_layers, sizeof *starts);
  if (!transfer_ms || !exec_ms || !starts)
    goto fail;
  for (i = 0; i < info.n_layers; i++) {
    ps_layer_info l;
    CHECK(ps_store_layer_info(store, model, i, &l, NULL, 0));
    transfer_ms[i] = (double)l.bytes / (bw * 1e6);
    exec_ms[i] = 0.001 * (double)l.bytes / 65536.0;
  }
  CHECK(ps_store_set_layer_exec_ms(store, model, exec_ms, info.n_layers));
  CHECK(ps_plan_model(store, model, bw, overhead, 0.005, starts, info.n_layers,
                      &n_groups, &makespan));
  printf("plan: %zu groups, predicted makespan %.4f ms (bandwidth %.1f GB/s, "
         "a = %.4f ms)\n",
         n_groups, makespan, bw, overhead);
  for (i = 0; i < n_groups; i++)
    printf("  group %zu starts at layer %zu\n", i, starts[i]);

  if (st == PS_ERR_NO_DRIVER) {
    printf("no CUDA driver: stopping before the GPU part\n");
    rc = 0;
    goto done;
  }

  /* 3. The switch: copies on the switch's stream, a worker stream waits. */
  CHECK(ps_arena_create(0, 256u << 20, 16u << 20, &arena));
  CHECK(ps_arena_alloc(arena, info.bytes, &region));
  CHECK(ps_switch_new(0, &sw));
  CHECK(ps_switch_start(sw, store, model, arena, region, starts, n_groups));
  for (i = 0; i < n_groups; i++)
    CHECK(ps_switch_wait_group(sw, i, NULL)); /* the worker's stream */
  CHECK(ps_switch_synchronize(sw));
  CHECK(ps_switch_elapsed_ms(sw, &copy_ms));
  printf("switch: %zu groups in %.4f ms (%.2f GB/s)\n", n_groups, copy_ms,
         (double)info.bytes / (copy_ms * 1e6));

  /* 4. Verify: the arena region holds exactly the model's bytes. */
  from_store = malloc(info.bytes);
  from_arena = malloc(info.bytes);
  if (!from_store || !from_arena)
    goto fail;
  CHECK(ps_store_read(store, model, 0, from_store, info.bytes));
  CHECK(ps_arena_read(arena, region, from_arena, info.bytes));
  if (memcmp(from_store, from_arena, info.bytes) != 0) {
    fprintf(stderr, "MISMATCH between store and arena\n");
    goto fail;
  }
  for (i = 0; i < info.n_tensors; i++) {
    uint64_t ptr = 0, base = 0, size = 0;
    ps_tensor_info t;
    CHECK(ps_store_tensor_info(store, model, i, &t, NULL, 0));
    CHECK(ps_switch_tensor_ptr(sw, i, &ptr));
    CHECK(ps_arena_base(arena, &base, &size));
    if (ptr != base + region + t.offset) {
      fprintf(stderr, "tensor %zu has the wrong device address\n", i);
      goto fail;
    }
  }
  printf("verified %llu bytes, checksum %016llx\n",
         (unsigned long long)info.bytes, fnv1a(from_arena, info.bytes));
  rc = 0;
  goto done;

fail:
  rc = 1;
done:
  free(from_store);
  free(from_arena);
  free(transfer_ms);
  free(exec_ms);
  free(starts);
  ps_switch_free(sw);
  ps_arena_free(arena);
  ps_store_free(store);
  ps_store_unlink(store_name);
  return rc;
}
