/* A client of `pipeswitch serve`, as an inference server's front end would
 * be: connects to the daemon of a GPU, sends one request for a stored model
 * with zero-filled inputs of the given shapes, and prints the outputs and
 * where the time went.
 *
 *   infer_client [--socket PATH] MODEL NAME:DTYPE:D0xD1x... [...]
 *
 * DTYPE is f32 or i32. Exit status: 0 on success, 2 when the daemon cannot
 * be reached or refuses, 1 on any other failure. */
#include <pipeswitch.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_INPUTS 16

static int fail(const char *what, ps_status s) {
    fprintf(stderr, "infer_client: %s: %s (%s)\n", what, ps_status_str(s), ps_last_error_message());
    return (s == PS_ERR_DISCONNECTED || s == PS_ERR_REFUSED) ? 2 : 1;
}

/* "name:f32:8x3x224x224" into a tensor description with zeroed data. */
static int parse_input(char *spec, ps_tensor_desc *t, uint64_t *shape) {
    char *name = strtok(spec, ":");
    char *dtype = strtok(NULL, ":");
    char *dims = strtok(NULL, ":");
    if (!name || !dtype || !dims) return -1;
    t->name = name;
    if (strcmp(dtype, "f32") == 0) t->dtype = PS_DTYPE_F32;
    else if (strcmp(dtype, "i32") == 0) t->dtype = PS_DTYPE_I32;
    else return -1;
    uint64_t n = 1;
    uint32_t ndim = 0;
    for (char *d = strtok(dims, "x"); d; d = strtok(NULL, "x")) {
        if (ndim == PS_MAX_DIMS) return -1;
        shape[ndim] = strtoull(d, NULL, 10);
        n *= shape[ndim++];
    }
    t->ndim = ndim;
    t->shape = shape;
    t->bytes = n * 4;
    t->data = calloc(n ? n : 1, 4);
    return t->data ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *socket = NULL;
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "--socket") == 0) {
        socket = argv[2];
        i = 3;
    }
    if (i >= argc) {
        fprintf(stderr, "usage: %s [--socket PATH] MODEL NAME:DTYPE:D0xD1x... [...]\n", argv[0]);
        return 1;
    }
    const char *model = argv[i++];
    ps_tensor_desc inputs[MAX_INPUTS];
    uint64_t shapes[MAX_INPUTS][PS_MAX_DIMS];
    size_t n_inputs = 0;
    for (; i < argc && n_inputs < MAX_INPUTS; i++, n_inputs++) {
        if (parse_input(argv[i], &inputs[n_inputs], shapes[n_inputs]) != 0) {
            fprintf(stderr, "infer_client: bad input %s (NAME:f32|i32:D0xD1x...)\n", argv[i]);
            return 1;
        }
    }
    ps_client *client = NULL;
    ps_status s = ps_client_connect(socket, 0, 60000, &client);
    if (s != PS_OK) return fail("connect", s);
    /* Large inputs go through this connection's input area: reserved here,
       the workers page-lock it before the first request (without this, the
       first large request reserves one). A refusal (the daemon's limits)
       is no error: the inputs then travel with the request. */
    uint64_t area = 0;
    for (size_t k = 0; k < n_inputs; k++) area += inputs[k].bytes + 256;
    if (area > 64 * 1024) {
        s = ps_client_reserve_inputs(client, area);
        if (s != PS_OK && s != PS_ERR_REFUSED) {
            ps_client_free(client);
            return fail("reserve_inputs", s);
        }
    }
    ps_result *result = NULL;
    s = ps_client_infer(client, model, inputs, n_inputs, &result);
    int rc = 0;
    if (s != PS_OK) {
        rc = fail("infer", s);
    } else {
        size_t n = 0;
        ps_timing t;
        ps_result_count(result, &n);
        for (size_t k = 0; k < n; k++) {
            ps_tensor_view v;
            if (ps_result_tensor(result, k, &v) != PS_OK) continue;
            printf("output %s: dtype %u, %u dims, %llu bytes\n", v.name, (unsigned)v.dtype, (unsigned)v.ndim,
                   (unsigned long long)v.bytes);
        }
        if (ps_result_timing(result, &t) == PS_OK)
            printf("queued %.3f ms, activation %.3f ms, worker %.3f ms, total %.3f ms\n", t.queued_ms, t.activation_ms,
                   t.worker_ms, t.total_ms);
        ps_daemon_stats st;
        if (ps_client_get_stats(client, &st) == PS_OK)
            printf("daemon: %llu requests, %llu hits, %llu misses, %u workers\n", (unsigned long long)st.requests,
                   (unsigned long long)st.hits, (unsigned long long)st.misses, (unsigned)st.workers);
    }
    ps_result_free(result);
    ps_client_free(client);
    for (size_t k = 0; k < n_inputs; k++) free((void *)inputs[k].data);
    return rc;
}
