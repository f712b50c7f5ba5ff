/*
 * run_model.c: a stored model run from C with libpipeswitch's built-in
 * worker, the way an inference server runs one.
 *
 *   run_model STORE MODEL --output NAME[=FILE] [--profile]
 *             [--input NAME=FILE | --input NAME=@ids|@zeros|@f32 ...]
 *
 * STORE is an existing host model store (ps_store_open) and MODEL a model in
 * it that carries its graph (a safetensors file with `pipeswitch.graph`
 * metadata, e.g. written by `write_model_file`). The program
 *
 * 1. binds the model's graph (ps_program_from_store) and sizes the inputs and
 *    the output from it (ps_program_tensor_bytes);
 * 2. measures the H2D bandwidth and per-copy overhead (ps_measure_h2d) and
 *    creates an arena for the model, the worker's activations and a
 *    workspace, a switch and a worker;
 * 3. profiles once when --profile is given or the store has no execution
 *    times for the model yet: a whole-model switch, a profiled run, the
 *    per-layer times stored with the model (ps_store_set_layer_exec_ms);
 * 4. plans the groups (ps_plan_model), zeroes the model's arena region (so
 *    that the run can only see weights its own switch copied), then starts
 *    the pipelined switch and runs the model as the groups arrive;
 * 5. reads the output, writes its raw bytes to FILE (if given) and prints
 *    its first values and sum.
 *
 * Inputs: --input NAME=FILE loads raw bytes (the input's dtype and shape
 * from the graph, little-endian; the size must match). NAME=@ids fills int32
 * ids v[i] = i % 97 (valid in every reference vocabulary), NAME=@zeros fills
 * zero bytes, NAME=@f32 fills floats v[i] = ((i % 17) - 8) / 8. Without any
 * --input the reference models' inputs present in the program are filled:
 * input_ids with @ids, token_type_ids with @zeros, images with @f32.
 *
 * The C API cannot list a program's inputs and outputs (nor their dtypes or
 * shapes), so the output's NAME comes from the command line (the reference
 * models: "ln_f.out" for GPT-2, "logits" for ResNet, "encoder.layer.<L-1>.out"
 * for BERT) and is read as float32, the dtype every op writes.
 *
 * Steps 1 and the input checks run on the CPU; without a CUDA driver or
 * device the program says so at step 2 and exits 1. Every call's status is
 * checked; a failure prints the call, its status and ps_last_error_message()
 * and exits 1 (2 for a usage error).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

/* Cleanup: a failing free is reported and fails the run. */
#define FREE(call)                                                             \
  do {                                                                         \
    ps_status st_ = (call);                                                    \
    if (st_ != PS_OK) {                                                        \
      fprintf(stderr, "%s failed: %s (%u): %s\n", #call, ps_status_str(st_),   \
              (unsigned)st_, ps_last_error_message());                         \
      rc = 1;                                                                  \
    }                                                                          \
  } while (0)

#define MAX_INPUTS 16
#define MIB (1024ull * 1024ull)

enum source { FROM_FILE, GEN_IDS, GEN_ZEROS, GEN_F32 };

struct input {
  const char *name;
  const char *path; /* FROM_FILE only */
  enum source src;
  unsigned char *data;
  size_t bytes;
};

static const char *source_name(enum source s) {
  switch (s) {
  case GEN_IDS:
    return "int32 ids i % 97";
  case GEN_ZEROS:
    return "zeros";
  case GEN_F32:
    return "float32 ((i % 17) - 8) / 8";
  default:
    return "file";
  }
}

static double now_ms(void) {
  struct timespec ts;
  if (timespec_get(&ts, TIME_UTC) != TIME_UTC)
    return 0.0;
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static void usage(const char *argv0) {
  fprintf(stderr,
          "usage: %s STORE MODEL --output NAME[=FILE] [--profile]\n"
          "          [--input NAME=FILE | --input NAME=@ids|@zeros|@f32 ...]\n",
          argv0);
}

/* Reads exactly `want` bytes of `path` into a new buffer; NULL (with a
 * message) if the file cannot be read or has another size. */
static unsigned char *read_file(const char *path, size_t want) {
  FILE *f = fopen(path, "rb");
  unsigned char *buf = NULL;
  long size;
  if (!f) {
    perror(path);
    return NULL;
  }
  if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 ||
      fseek(f, 0, SEEK_SET) != 0) {
    perror(path);
    goto out;
  }
  if ((unsigned long)size != (unsigned long)want) {
    fprintf(stderr, "%s has %ld bytes; the input needs %zu\n", path, size,
            want);
    goto out;
  }
  buf = malloc(want ? want : 1);
  if (!buf) {
    fprintf(stderr, "out of host memory for %s\n", path);
    goto out;
  }
  if (want && fread(buf, 1, want, f) != want) {
    fprintf(stderr, "%s: short read\n", path);
    free(buf);
    buf = NULL;
  }
out:
  fclose(f);
  return buf;
}

static int write_file(const char *path, const void *data, size_t bytes) {
  FILE *f = fopen(path, "wb");
  int ok;
  if (!f) {
    perror(path);
    return 0;
  }
  ok = fwrite(data, 1, bytes, f) == bytes;
  if (fclose(f) != 0)
    ok = 0;
  if (!ok)
    fprintf(stderr, "%s: write failed\n", path);
  return ok;
}

/* The input's bytes: from its file or generated. 0 on failure. */
static int load_input(struct input *in) {
  size_t i, n = in->bytes / 4;
  if (in->src == FROM_FILE) {
    in->data = read_file(in->path, in->bytes);
    return in->data != NULL;
  }
  if (in->src != GEN_ZEROS && in->bytes % 4 != 0) {
    fprintf(stderr, "input %s has %zu bytes: not 4-byte elements for %s\n",
            in->name, in->bytes, source_name(in->src));
    return 0;
  }
  in->data = calloc(in->bytes ? in->bytes : 1, 1);
  if (!in->data) {
    fprintf(stderr, "out of host memory for input %s\n", in->name);
    return 0;
  }
  for (i = 0; i < n; i++) {
    if (in->src == GEN_IDS) {
      int32_t v = (int32_t)(i % 97);
      memcpy(in->data + 4 * i, &v, 4);
    } else if (in->src == GEN_F32) {
      float v = (float)((int)(i % 17) - 8) / 8.0f;
      memcpy(in->data + 4 * i, &v, 4);
    }
  }
  return 1;
}

static double abs_d(double x) { return x < 0 ? -x : x; }

int main(int argc, char **argv) {
  const char *store_name, *model, *out_path = NULL;
  char *out_name = NULL;
  struct input inputs[MAX_INPUTS];
  size_t n_inputs = 0;
  int profile = 0, a;
  ps_store *store = NULL;
  ps_program *program = NULL;
  ps_arena *arena = NULL;
  ps_switch *sw = NULL;
  ps_worker *worker = NULL;
  ps_model_info info;
  uint64_t act_bytes = 0, out_bytes = 0, region = 0, arena_bytes, ws_bytes;
  size_t i, n_groups = 0, *starts = NULL, n_out;
  double bw = 0.0, overhead = 0.0, makespan = 0.0, copy_ms = 0.0, t0, t1;
  double *layer_ms = NULL, sum = 0.0, total_ms = 0.0;
  float *out = NULL, *whole_out = NULL;
  unsigned char *zeros = NULL;
  ps_status st;
  int rc = 1;

  memset(inputs, 0, sizeof inputs);
  if (argc < 3) {
    usage(argv[0]);
    return 2;
  }
  store_name = argv[1];
  model = argv[2];
  for (a = 3; a < argc; a++) {
    if (strcmp(argv[a], "--profile") == 0) {
      profile = 1;
    } else if ((strcmp(argv[a], "--input") == 0 ||
                strcmp(argv[a], "--output") == 0) &&
               a + 1 < argc) {
      int is_input = argv[a][2] == 'i';
      char *arg = argv[++a], *eq = strchr(arg, '=');
      if (eq == arg || (is_input && (!eq || eq[1] == '\0'))) {
        fprintf(stderr, "bad %s %s: want NAME=%s\n", argv[a - 1], arg,
                is_input ? "FILE or NAME=@ids|@zeros|@f32" : "FILE or NAME");
        return 2;
      }
      if (eq)
        *eq = '\0'; /* argv strings are the program's to modify */
      if (!is_input) {
        out_name = arg;
        out_path = eq && eq[1] ? eq + 1 : NULL;
        continue;
      }
      if (n_inputs == MAX_INPUTS) {
        fprintf(stderr, "at most %d inputs\n", MAX_INPUTS);
        return 2;
      }
      inputs[n_inputs].name = arg;
      if (strcmp(eq + 1, "@ids") == 0)
        inputs[n_inputs].src = GEN_IDS;
      else if (strcmp(eq + 1, "@zeros") == 0)
        inputs[n_inputs].src = GEN_ZEROS;
      else if (strcmp(eq + 1, "@f32") == 0)
        inputs[n_inputs].src = GEN_F32;
      else if (eq[1] == '@') {
        fprintf(stderr, "unknown generator %s (@ids, @zeros or @f32)\n",
                eq + 1);
        return 2;
      } else {
        inputs[n_inputs].src = FROM_FILE;
        inputs[n_inputs].path = eq + 1;
      }
      n_inputs++;
    } else {
      usage(argv[0]);
      return 2;
    }
  }
  if (!out_name) {
    fprintf(stderr, "--output NAME is required: the C API cannot list a "
                    "program's outputs\n");
    usage(argv[0]);
    return 2;
  }
  if (ps_version_number() != PS_VERSION_NUMBER) {
    fprintf(stderr, "header %d and library %u disagree\n", PS_VERSION_NUMBER,
            (unsigned)ps_version_number());
    return 1;
  }
  printf("libpipeswitch %s\n", ps_version_string());

  /* 1. The store, the model and its program (all on the CPU). */
  CHECK(ps_store_open(store_name, &store));
  CHECK(ps_store_model_info(store, model, &info));
  CHECK(ps_program_from_store(store, model, &program));
  CHECK(ps_program_activation_bytes(program, &act_bytes));
  printf("model %s: %llu bytes, %zu layers, %zu tensors; activations %llu "
         "bytes\n",
         model, (unsigned long long)info.bytes, info.n_layers, info.n_tensors,
         (unsigned long long)act_bytes);

  if (n_inputs == 0) {
    /* The reference models' inputs, where the program has them. */
    static const char *const names[3] = {"input_ids", "token_type_ids",
                                         "images"};
    static const enum source gens[3] = {GEN_IDS, GEN_ZEROS, GEN_F32};
    for (i = 0; i < 3; i++) {
      uint64_t b = 0;
      st = ps_program_tensor_bytes(program, names[i], &b);
      if (st == PS_ERR_NOT_FOUND)
        continue;
      CHECK(st);
      inputs[n_inputs].name = names[i];
      inputs[n_inputs].src = gens[i];
      n_inputs++;
    }
    if (n_inputs == 0) {
      fprintf(stderr,
              "no --input given and the model has none of the reference "
              "inputs (input_ids, token_type_ids, images): name its inputs "
              "with --input (the C API cannot list them)\n");
      goto fail;
    }
  }
  for (i = 0; i < n_inputs; i++) {
    uint64_t b = 0;
    CHECK(ps_program_tensor_bytes(program, inputs[i].name, &b));
    inputs[i].bytes = (size_t)b;
    if (!load_input(&inputs[i]))
      goto fail;
    if (inputs[i].src == FROM_FILE)
      printf("input %s: %zu bytes from %s\n", inputs[i].name,
             inputs[i].bytes, inputs[i].path);
    else
      printf("input %s: %zu bytes, %s (generated)\n", inputs[i].name,
             inputs[i].bytes, source_name(inputs[i].src));
  }
  CHECK(ps_program_tensor_bytes(program, out_name, &out_bytes));
  if (out_bytes % 4 != 0) {
    fprintf(stderr, "output %s has %llu bytes: not float32\n", out_name,
            (unsigned long long)out_bytes);
    goto fail;
  }
  n_out = (size_t)(out_bytes / 4);
  printf("output %s: %llu bytes (%zu float32)\n", out_name,
         (unsigned long long)out_bytes, n_out);

  layer_ms = calloc(info.n_layers, sizeof *layer_ms);
  starts = calloc(info.n_layers, sizeof *starts);
  out = malloc(n_out ? out_bytes : 1);
  if (!layer_ms || !starts || !out) {
    fprintf(stderr, "out of host memory\n");
    goto fail;
  }
  for (i = 0; i < info.n_layers; i++) {
    ps_layer_info l;
    CHECK(ps_store_layer_info(store, model, i, &l, NULL, 0));
    if (l.exec_ms != l.exec_ms) /* NaN: never measured */
      profile = 1;
  }

  /* 2. The GPU: bandwidth, arena, switch, worker. */
  st = ps_measure_h2d(0, 64 * MIB, &bw, &overhead);
  if (st != PS_OK) {
    fprintf(stderr, "ps_measure_h2d failed: %s (%u): %s\n", ps_status_str(st),
            (unsigned)st, ps_last_error_message());
    if (st == PS_ERR_NO_DRIVER || st == PS_ERR_NO_DEVICE)
      fprintf(stderr, "run_model needs a CUDA GPU to run the model; the "
                      "store, program and input checks above passed\n");
    goto fail;
  }
  printf("H2D: %.2f GB/s, %.4f ms per copy\n", bw, overhead);
  ws_bytes = 2 * MIB;
  /* The model's region and the worker's activations (256-aligned regions),
   * room for alignment, and the workspace. */
  arena_bytes = align_up(info.bytes, 256) + align_up(act_bytes, 256) +
                2 * MIB + ws_bytes;
  CHECK(ps_arena_create(0, arena_bytes, ws_bytes, &arena));
  CHECK(ps_arena_alloc(arena, info.bytes, &region));
  CHECK(ps_switch_new(0, &sw));
  CHECK(ps_worker_new(arena, &worker));
  CHECK(ps_worker_prepare(worker, program));
  CHECK(ps_store_pin(store, 0));
  for (i = 0; i < n_inputs; i++)
    CHECK(ps_worker_set_input(worker, program, inputs[i].name, inputs[i].data,
                              inputs[i].bytes));

  /* 3. Profile: whole-model switch, profiled run, per-layer times. */
  if (profile) {
    CHECK(ps_switch_start_whole(sw, store, model, arena, region));
    CHECK(ps_worker_run(worker, program, sw, 1));
    CHECK(ps_worker_layer_ms(worker, program, layer_ms, info.n_layers));
    CHECK(ps_switch_elapsed_ms(sw, &copy_ms));
    for (i = 0; i < info.n_layers; i++)
      total_ms += layer_ms[i];
    CHECK(ps_store_set_layer_exec_ms(store, model, layer_ms, info.n_layers));
    whole_out = malloc(n_out ? out_bytes : 1);
    if (!whole_out) {
      fprintf(stderr, "out of host memory\n");
      goto fail;
    }
    CHECK(ps_worker_read(worker, program, out_name, whole_out,
                         (size_t)out_bytes));
    printf("profiled: whole-model switch %.4f ms, run %.4f ms over %zu "
           "layers (stored with the model)\n",
           copy_ms, total_ms, info.n_layers);
  } else {
    printf("profile: using the execution times stored with the model\n");
  }

  /* 4. Plan, clear the region, pipelined switch + run. */
  CHECK(ps_plan_model(store, model, bw, overhead, 0.005, starts,
                      info.n_layers, &n_groups, &makespan));
  printf("plan: %zu groups, predicted %.4f ms\n", n_groups, makespan);
  CHECK(ps_switch_synchronize(sw));
  CHECK(ps_worker_synchronize(worker));
  zeros = calloc(info.bytes ? info.bytes : 1, 1);
  if (!zeros) {
    fprintf(stderr, "out of host memory\n");
    goto fail;
  }
  CHECK(ps_arena_write(arena, region, zeros, (size_t)info.bytes));
  t0 = now_ms();
  CHECK(ps_switch_start(sw, store, model, arena, region, starts, n_groups));
  CHECK(ps_worker_run(worker, program, sw, 0));
  CHECK(ps_worker_synchronize(worker));
  t1 = now_ms();
  CHECK(ps_switch_elapsed_ms(sw, &copy_ms));
  printf("pipelined switch + run: %.4f ms (host), copies %.4f ms (GPU)\n",
         t1 - t0, copy_ms);

  /* 5. The output. */
  CHECK(ps_worker_read(worker, program, out_name, out, (size_t)out_bytes));
  if (whole_out) {
    double diff = 0.0, big = 1.0;
    for (i = 0; i < n_out; i++) {
      double d = abs_d((double)out[i] - (double)whole_out[i]);
      if (d > diff || d != d)
        diff = d;
      if (abs_d((double)whole_out[i]) > big)
        big = abs_d((double)whole_out[i]);
    }
    printf("pipelined vs whole-model run: max |diff| %g\n", diff);
    if (!(diff <= 1e-3 * big)) {
      fprintf(stderr, "the pipelined run differs from the whole-model run\n");
      goto fail;
    }
  }
  if (out_path && !write_file(out_path, out, (size_t)out_bytes))
    goto fail;
  for (i = 0; i < n_out; i++)
    sum += (double)out[i];
  printf("output %s:", out_name);
  for (i = 0; i < n_out && i < 6; i++)
    printf(" %.6g", (double)out[i]);
  printf("%s sum %.9g\n", n_out > 6 ? " ..." : "", sum);
  if (out_path)
    printf("wrote %llu bytes to %s\n", (unsigned long long)out_bytes,
           out_path);
  rc = 0;
  goto done;

fail:
  rc = 1;
done:
  for (i = 0; i < n_inputs; i++)
    free(inputs[i].data);
  free(zeros);
  free(out);
  free(whole_out);
  free(layer_ms);
  free(starts);
  /* The worker first: it returns its activations to the arena. */
  FREE(ps_worker_free(worker));
  FREE(ps_program_free(program));
  FREE(ps_switch_free(sw));
  FREE(ps_arena_free(arena));
  FREE(ps_store_free(store));
  return rc;
}
