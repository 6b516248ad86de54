// A stateful sample: every request adds one to a count kept in a file on the pod's volume
// ($COUNT_FILE, default /data/count) and answers
//   count=<N> | Running on: <HOSTNAME>
// so the count survives the pod being deleted and made again with the same claim.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "counter.h"

static void env_get(const char *key, char *out, size_t cap, const char *dflt) {
    counter_list_tuple2_string_string_t env;
    wasi_cli_environment_get_environment(&env);
    snprintf(out, cap, "%s", dflt);
    size_t klen = strlen(key);
    for (size_t i = 0; i < env.len; i++) {
        counter_string_t *k = &env.ptr[i].f0, *v = &env.ptr[i].f1;
        if (k->len == klen && memcmp(k->ptr, key, klen) == 0) {
            size_t n = v->len < cap - 1 ? v->len : cap - 1;
            memcpy(out, v->ptr, n);
            out[n] = 0;
        }
    }
    counter_list_tuple2_string_string_free(&env);
}

// Reads the count, adds one and writes it back (through a temporary file and a rename, so a
// crash never leaves half a number). Returns -1 when the volume cannot be written.
static long bump(const char *path) {
    long n = 0;
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%ld", &n) != 1) n = 0;
        fclose(f);
    }
    n++;
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = fopen(tmp, "w");
    if (!f) return -1;
    fprintf(f, "%ld\n", n);
    if (fclose(f) != 0) return -1;
    if (rename(tmp, path) != 0) return -1;
    return n;
}

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    char host[256], path[512], body[1024];
    env_get("HOSTNAME", host, sizeof host, "unknown");
    env_get("COUNT_FILE", path, sizeof path, "/data/count");
    long n = bump(path);
    int len;
    uint16_t status = 200;
    if (n < 0) {
        status = 500;
        len = snprintf(body, sizeof body, "cannot write %s | Running on: %s\n", path, host);
    } else {
        len = snprintf(body, sizeof body, "count=%ld | Running on: %s\n", n, host);
    }

    wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
    wasi_http_types_field_name_t name;
    counter_string_set(&name, "content-type");
    wasi_http_types_field_value_t value = {(uint8_t *)"text/plain", 10};
    wasi_http_types_header_error_t herr;
    wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &name, &value, &herr);

    wasi_http_types_own_outgoing_response_t response = wasi_http_types_constructor_outgoing_response(headers);
    wasi_http_types_method_outgoing_response_set_status_code(wasi_http_types_borrow_outgoing_response(response), status);
    wasi_http_types_own_outgoing_body_t out_body;
    wasi_http_types_method_outgoing_response_body(wasi_http_types_borrow_outgoing_response(response), &out_body);

    wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(response_out, &result);

    wasi_http_types_own_output_stream_t stream;
    if (wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(out_body), &stream)) {
        counter_list_u8_t bytes = {(uint8_t *)body, (size_t)len};
        wasi_io_streams_stream_error_t err;
        wasi_io_streams_method_output_stream_blocking_write_and_flush(wasi_io_streams_borrow_output_stream(stream), &bytes, &err);
        wasi_io_streams_output_stream_drop_own(stream);
    }
    wasi_http_types_error_code_t ferr;
    wasi_http_types_static_outgoing_body_finish(out_body, NULL, &ferr);
    wasi_http_types_incoming_request_drop_own(request);
}
