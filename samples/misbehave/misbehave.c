// A wasi:http component that misbehaves on request, for testing the runtime's limits (it
// uses the bootcamp world: it exports wasi:http/incoming-handler).
//   /trap   executes an unreachable instruction
//   /spin   loops forever (only the CPU deadline stops it)
//   /grow   allocates until memory runs out
//   other   answers "ok"
#include <stdlib.h>
#include <string.h>

#include "bootcamp.h"

static void answer(exports_wasi_http_incoming_handler_own_response_outparam_t out, const char *text) {
    wasi_http_types_own_outgoing_response_t response =
        wasi_http_types_constructor_outgoing_response(wasi_http_types_constructor_fields());
    wasi_http_types_own_outgoing_body_t body;
    wasi_http_types_method_outgoing_response_body(wasi_http_types_borrow_outgoing_response(response), &body);
    wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(out, &result);
    wasi_http_types_own_output_stream_t stream;
    if (wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(body), &stream)) {
        bootcamp_list_u8_t bytes = {(uint8_t *)text, strlen(text)};
        wasi_io_streams_stream_error_t err;
        wasi_io_streams_method_output_stream_blocking_write_and_flush(wasi_io_streams_borrow_output_stream(stream), &bytes, &err);
        wasi_io_streams_output_stream_drop_own(stream);
    }
    wasi_http_types_error_code_t ferr;
    wasi_http_types_static_outgoing_body_finish(body, NULL, &ferr);
}

static volatile unsigned long sink;

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    bootcamp_string_t path = {0};
    wasi_http_types_method_incoming_request_path_with_query(wasi_http_types_borrow_incoming_request(request), &path);
    if (path.len == 5 && memcmp(path.ptr, "/trap", 5) == 0) {
        __builtin_trap();
    } else if (path.len == 5 && memcmp(path.ptr, "/spin", 5) == 0) {
        for (unsigned long i = 0;; i++) sink = i;
    } else if (path.len == 5 && memcmp(path.ptr, "/grow", 5) == 0) {
        for (;;) {
            char *p = malloc(1 << 20);
            if (!p) break;
            p[0] = 1;
            sink += (unsigned long)p;
        }
        answer(response_out, "allocation failed\n");
    } else {
        answer(response_out, "ok\n");
    }
    bootcamp_string_free(&path);
    wasi_http_types_incoming_request_drop_own(request);
}
