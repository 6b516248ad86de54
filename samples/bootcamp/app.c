// The kubernetes-bootcamp app as a wasi:http component: every request is answered with
//   Hello Kubernetes bootcamp! | Running on: <HOSTNAME> | v=<BOOTCAMP_VERSION>
// HOSTNAME is the pod's name (skiff sets it, as Kubernetes does for containers).
#include <stdio.h>
#include <string.h>

#include "bootcamp.h"

#ifndef BOOTCAMP_VERSION
#define BOOTCAMP_VERSION "1"
#endif

static void hostname(char *out, size_t cap) {
    bootcamp_list_tuple2_string_string_t env;
    wasi_cli_environment_get_environment(&env);
    snprintf(out, cap, "unknown");
    for (size_t i = 0; i < env.len; i++) {
        bootcamp_string_t *k = &env.ptr[i].f0, *v = &env.ptr[i].f1;
        if (k->len == 8 && memcmp(k->ptr, "HOSTNAME", 8) == 0) {
            size_t n = v->len < cap - 1 ? v->len : cap - 1;
            memcpy(out, v->ptr, n);
            out[n] = 0;
        }
    }
    bootcamp_list_tuple2_string_string_free(&env);
}

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    char host[256];
    char body[512];
    hostname(host, sizeof host);
    int len = snprintf(body, sizeof body, "Hello Kubernetes bootcamp! | Running on: %s | v=%s\n", host, BOOTCAMP_VERSION);

    wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
    wasi_http_types_field_name_t name;
    bootcamp_string_set(&name, "content-type");
    wasi_http_types_field_value_t value = {(uint8_t *)"text/plain", 10};
    wasi_http_types_header_error_t herr;
    wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &name, &value, &herr);

    wasi_http_types_own_outgoing_response_t response = wasi_http_types_constructor_outgoing_response(headers);
    wasi_http_types_method_outgoing_response_set_status_code(wasi_http_types_borrow_outgoing_response(response), 200);
    wasi_http_types_own_outgoing_body_t out_body;
    wasi_http_types_method_outgoing_response_body(wasi_http_types_borrow_outgoing_response(response), &out_body);

    wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(response_out, &result);

    wasi_http_types_own_output_stream_t stream;
    if (wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(out_body), &stream)) {
        bootcamp_list_u8_t bytes = {(uint8_t *)body, (size_t)len};
        wasi_io_streams_stream_error_t err;
        wasi_io_streams_method_output_stream_blocking_write_and_flush(wasi_io_streams_borrow_output_stream(stream), &bytes, &err);
        wasi_io_streams_output_stream_drop_own(stream);
    }
    wasi_http_types_error_code_t ferr;
    wasi_http_types_static_outgoing_body_finish(out_body, NULL, &ferr);
    wasi_http_types_incoming_request_drop_own(request);
}
