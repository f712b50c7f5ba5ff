/* Handles shared between POSIX threads, as a C server would share them:
 * a store handle used by two threads while a third frees it, one handle
 * freed by two threads at once, and freed handles kept while new ones are
 * made. Every call must answer PS_OK or PS_ERR_INVALID_HANDLE, a refused
 * handle must stay refused, and exactly one of two frees must succeed.
 * No GPU needed. Usage: handle_threads STORE_NAME (the store is made and
 * unlinked here). Prints "handle threads: OK" and exits 0, else exits 1.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeswitch.h"

static const char *name;

#define CHECK(cond, ...)                          \
  do {                                            \
    if (!(cond)) {                                \
      fprintf(stderr, "FAILED: " __VA_ARGS__);    \
      fprintf(stderr, " (line %d; last error: %s)\n", __LINE__, ps_last_error_message()); \
      exit(1);                                    \
    }                                             \
  } while (0)

static ps_store *open_store(void) {
  ps_store *h = NULL;
  ps_status st = ps_store_open(name, &h);
  CHECK(st == PS_OK && h != NULL, "ps_store_open: %d", (int)st);
  return h;
}

/* ---- use during free ---------------------------------------------------- */

struct reader {
  ps_store *h;
  atomic_int *calls;
};

static void *read_until_refused(void *arg) {
  struct reader *r = arg;
  int refused = 0;
  while (refused < 20) {
    size_t n = 4242;
    ps_status st = ps_store_model_count(r->h, &n);
    if (st == PS_OK) {
      CHECK(refused == 0, "a freed handle worked again");
      CHECK(n == 1, "model count %zu", n);
    } else {
      CHECK(st == PS_ERR_INVALID_HANDLE, "ps_store_model_count: status %d", (int)st);
      CHECK(n == 4242, "a refused call wrote its output");
      refused++;
    }
    atomic_fetch_add(r->calls, 1);
  }
  return NULL;
}

static void use_during_free(void) {
  for (int round = 0; round < 200; round++) {
    atomic_int calls = 0;
    struct reader r = {open_store(), &calls};
    pthread_t t[2];
    for (int i = 0; i < 2; i++) CHECK(pthread_create(&t[i], NULL, read_until_refused, &r) == 0, "pthread_create");
    while (atomic_load(&calls) < round % 4 * 4) {
    }
    CHECK(ps_store_free(r.h) == PS_OK, "round %d: free", round);
    ps_store *fresh = open_store(); /* must not revive r.h */
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    CHECK(fresh != r.h, "a handle value was given out twice");
    CHECK(ps_store_free(r.h) == PS_ERR_INVALID_HANDLE, "round %d: second free", round);
    CHECK(ps_store_free(fresh) == PS_OK, "round %d: the new handle", round);
  }
}

/* ---- double free from two threads --------------------------------------- */

struct freer {
  ps_store *h;
  atomic_int *ready;
  ps_status status;
};

static void *free_it(void *arg) {
  struct freer *f = arg;
  atomic_fetch_add(f->ready, 1);
  while (atomic_load(f->ready) < 2) {
  }
  f->status = ps_store_free(f->h);
  return NULL;
}

static void double_free(void) {
  for (int round = 0; round < 200; round++) {
    atomic_int ready = 0;
    ps_store *h = open_store();
    struct freer f[2] = {{h, &ready, -1}, {h, &ready, -1}};
    pthread_t t[2];
    for (int i = 0; i < 2; i++) CHECK(pthread_create(&t[i], NULL, free_it, &f[i]) == 0, "pthread_create");
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    int oks = (f[0].status == PS_OK) + (f[1].status == PS_OK);
    int refused = (f[0].status == PS_ERR_INVALID_HANDLE) + (f[1].status == PS_ERR_INVALID_HANDLE);
    CHECK(oks == 1 && refused == 1, "round %d: statuses %d and %d", round, (int)f[0].status, (int)f[1].status);
  }
}

/* ---- freed handles stay freed -------------------------------------------- */

static void stale_handles(void) {
  enum { OLD = 64, NEW = 256 };
  ps_store *old[OLD], *fresh[NEW];
  for (int i = 0; i < OLD; i++) old[i] = open_store();
  for (int i = 0; i < OLD; i++) CHECK(ps_store_free(old[i]) == PS_OK, "free %d", i);
  for (int i = 0; i < NEW; i++) fresh[i] = open_store();
  for (int i = 0; i < OLD; i++) {
    size_t n = 4242;
    CHECK(ps_store_model_count(old[i], &n) == PS_ERR_INVALID_HANDLE, "stale handle %d works again", i);
    CHECK(ps_store_free(old[i]) == PS_ERR_INVALID_HANDLE, "stale handle %d was freed again", i);
  }
  for (int i = 0; i < NEW; i++) {
    size_t n = 0;
    CHECK(ps_store_model_count(fresh[i], &n) == PS_OK && n == 1, "new handle %d was freed through a stale one", i);
    CHECK(ps_store_free(fresh[i]) == PS_OK, "new handle %d", i);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s STORE_NAME\n", argv[0]);
    return 2;
  }
  name = argv[1];
  ps_store_unlink(name);
  ps_store *store = NULL;
  CHECK(ps_store_create(name, 1u << 20, 8, &store) == PS_OK, "ps_store_create");
  float data[64];
  for (int i = 0; i < 64; i++) data[i] = (float)i;
  uint64_t shape[1] = {64};
  ps_tensor_desc t = {"block.w", PS_DTYPE_F32, 1, shape, data, sizeof data};
  ps_layer_desc l = {"block", 1};
  CHECK(ps_store_add_model(store, "m", &l, 1, &t, 1) == PS_OK, "ps_store_add_model");

  use_during_free();
  double_free();
  stale_handles();

  CHECK(ps_store_free(store) == PS_OK, "ps_store_free");
  CHECK(ps_store_unlink(name) == PS_OK, "ps_store_unlink");
  printf("handle threads: OK\n");
  return 0;
}
