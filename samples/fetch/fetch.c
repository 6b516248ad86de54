// A wasi:http component that calls another service: each request it receives is answered
// with the status and body of `GET $UPSTREAM` (for example
// UPSTREAM=http://kubernetes-bootcamp:8080/, a service name resolved by the cluster):
//   fetched http://kubernetes-bootcamp:8080/ from <HOSTNAME>: 200 Hello Kubernetes ...
// With TOKEN_FILE set, the request carries `Authorization: Bearer <the file's content>`: with
// UPSTREAM=https://kubernetes.default.svc/api/v1/namespaces/NS/pods and
// TOKEN_FILE=/var/run/secrets/kubernetes.io/serviceaccount/token the pod calls the API server
// as its ServiceAccount (the node trusts the cluster CA for its guests' HTTPS).
// Errors are answered 502 with the wasi:http error code.
#include <stdio.h>
#include <string.h>

#include "fetch.h"

static void getenv_into(const char *key, char *out, size_t cap) {
    fetch_list_tuple2_string_string_t env;
    wasi_cli_environment_get_environment(&env);
    size_t klen = strlen(key);
    out[0] = 0;
    for (size_t i = 0; i < env.len; i++) {
        fetch_string_t *k = &env.ptr[i].f0, *v = &env.ptr[i].f1;
        if (k->len == klen && memcmp(k->ptr, key, klen) == 0) {
            size_t n = v->len < cap - 1 ? v->len : cap - 1;
            memcpy(out, v->ptr, n);
            out[n] = 0;
        }
    }
    fetch_list_tuple2_string_string_free(&env);
}

// Splits http(s)://AUTHORITY/PATH; sets *https. Returns 0 when the URL is neither.
static int split_url(const char *url, int *https, char *authority, size_t acap, char *path, size_t pcap) {
    const char *p = url;
    if (strncmp(p, "http://", 7) == 0) {
        *https = 0;
        p += 7;
    } else if (strncmp(p, "https://", 8) == 0) {
        *https = 1;
        p += 8;
    } else {
        return 0;
    }
    const char *slash = strchr(p, '/');
    size_t alen = slash ? (size_t)(slash - p) : strlen(p);
    if (alen == 0 || alen >= acap) return 0;
    memcpy(authority, p, alen);
    authority[alen] = 0;
    snprintf(path, pcap, "%s", slash ? slash : "/");
    return 1;
}

// The headers of the call: `Authorization: Bearer TOKEN` when token_file names a readable
// file. Returns 0 (and says why in out) when it names one that cannot be read.
static int headers(const char *token_file, wasi_http_types_own_fields_t *fields, char *out, size_t cap) {
    *fields = wasi_http_types_constructor_fields();
    if (!token_file[0]) return 1;
    FILE *f = fopen(token_file, "r");
    if (!f) {
        snprintf(out, cap, "cannot read TOKEN_FILE %s", token_file);
        return 0;
    }
    static char value[8192];
    size_t n = (size_t)snprintf(value, sizeof value, "Bearer ");
    n += fread(value + n, 1, sizeof value - 1 - n, f);
    fclose(f);
    while (n > 7 && (value[n - 1] == '\n' || value[n - 1] == '\r' || value[n - 1] == ' ')) n--;
    fetch_string_t name;
    fetch_string_set(&name, "authorization");
    wasi_http_types_field_value_t v = {(uint8_t *)value, n};
    wasi_http_types_header_error_t err;
    wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(*fields), &name, &v, &err);
    return 1;
}

// GET url; writes "STATUS BODY" or an error into out. Returns the HTTP status to answer with.
static int get(const char *url, const char *token_file, char *out, size_t cap) {
    char authority[256], path[512];
    int https = 0;
    if (!split_url(url, &https, authority, sizeof authority, path, sizeof path)) {
        snprintf(out, cap, "UPSTREAM must be an http:// or https:// URL, got \"%s\"", url);
        return 500;
    }
    wasi_http_types_own_fields_t fields;
    if (!headers(token_file, &fields, out, cap)) return 500;
    wasi_http_types_own_outgoing_request_t req = wasi_http_types_constructor_outgoing_request(fields);
    wasi_http_types_borrow_outgoing_request_t breq = wasi_http_types_borrow_outgoing_request(req);
    wasi_http_types_method_t method = {.tag = WASI_HTTP_TYPES_METHOD_GET};
    wasi_http_types_scheme_t scheme = {.tag = https ? WASI_HTTP_TYPES_SCHEME_HTTPS : WASI_HTTP_TYPES_SCHEME_HTTP};
    fetch_string_t a, pq;
    fetch_string_set(&a, authority);
    fetch_string_set(&pq, path);
    wasi_http_types_method_outgoing_request_set_method(breq, &method);
    wasi_http_types_method_outgoing_request_set_scheme(breq, &scheme);
    wasi_http_types_method_outgoing_request_set_authority(breq, &a);
    wasi_http_types_method_outgoing_request_set_path_with_query(breq, &pq);

    wasi_http_outgoing_handler_own_future_incoming_response_t fut;
    wasi_http_outgoing_handler_error_code_t err;
    if (!wasi_http_outgoing_handler_handle(req, NULL, &fut, &err)) {
        snprintf(out, cap, "request refused (wasi:http error code %d)", err.tag);
        return 502;
    }
    wasi_http_types_borrow_future_incoming_response_t bfut = wasi_http_types_borrow_future_incoming_response(fut);
    wasi_http_types_own_pollable_t ready = wasi_http_types_method_future_incoming_response_subscribe(bfut);
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
    wasi_io_poll_pollable_drop_own(ready);
    wasi_http_types_result_result_own_incoming_response_error_code_void_t got;
    int status = 502;
    if (!wasi_http_types_method_future_incoming_response_get(bfut, &got) || got.is_err) {
        snprintf(out, cap, "no response");
    } else if (got.val.ok.is_err) {
        snprintf(out, cap, "failed (wasi:http error code %d)", got.val.ok.val.err.tag);
    } else {
        wasi_http_types_own_incoming_response_t resp = got.val.ok.val.ok;
        wasi_http_types_borrow_incoming_response_t bresp = wasi_http_types_borrow_incoming_response(resp);
        int code = wasi_http_types_method_incoming_response_status(bresp);
        size_t n = (size_t)snprintf(out, cap, "%d ", code);
        wasi_http_types_own_incoming_body_t body;
        if (wasi_http_types_method_incoming_response_consume(bresp, &body)) {
            wasi_http_types_own_input_stream_t stream;
            if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
                for (;;) {
                    fetch_list_u8_t chunk;
                    wasi_io_streams_stream_error_t serr;
                    if (!wasi_io_streams_method_input_stream_blocking_read(
                            wasi_io_streams_borrow_input_stream(stream), 4096, &chunk, &serr))
                        break;  // closed: the whole body is in
                    size_t take = chunk.len < cap - 1 - n ? chunk.len : cap - 1 - n;
                    memcpy(out + n, chunk.ptr, take);
                    n += take;
                    out[n] = 0;
                    fetch_list_u8_free(&chunk);
                }
                wasi_io_streams_input_stream_drop_own(stream);
            }
            wasi_http_types_incoming_body_drop_own(body);
        }
        wasi_http_types_incoming_response_drop_own(resp);
        status = 200;
    }
    wasi_http_types_future_incoming_response_drop_own(fut);
    return status;
}

void exports_wasi_http_incoming_handler_handle(
    exports_wasi_http_incoming_handler_own_incoming_request_t request,
    exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    char upstream[512], host[256], token_file[512], fetched[8192], body[9216];
    getenv_into("UPSTREAM", upstream, sizeof upstream);
    getenv_into("HOSTNAME", host, sizeof host);
    getenv_into("TOKEN_FILE", token_file, sizeof token_file);
    int status = get(upstream, token_file, fetched, sizeof fetched);
    int len = snprintf(body, sizeof body, "fetched %s from %s: %s", upstream, host, fetched);
    if (len > (int)sizeof body - 1) len = sizeof body - 1;

    wasi_http_types_own_outgoing_response_t response =
        wasi_http_types_constructor_outgoing_response(wasi_http_types_constructor_fields());
    wasi_http_types_method_outgoing_response_set_status_code(wasi_http_types_borrow_outgoing_response(response), status);
    wasi_http_types_own_outgoing_body_t out_body;
    wasi_http_types_method_outgoing_response_body(wasi_http_types_borrow_outgoing_response(response), &out_body);
    wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false};
    result.val.ok = response;
    wasi_http_types_static_response_outparam_set(response_out, &result);

    wasi_http_types_own_output_stream_t stream;
    if (wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(out_body), &stream)) {
        // blocking-write-and-flush takes at most 4096 bytes a call.
        for (int off = 0; off < len; off += 4096) {
            int part = len - off < 4096 ? len - off : 4096;
            fetch_list_u8_t bytes = {(uint8_t *)body + off, (size_t)part};
            wasi_io_streams_stream_error_t err;
            if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
                    wasi_io_streams_borrow_output_stream(stream), &bytes, &err))
                break;
        }
        wasi_io_streams_output_stream_drop_own(stream);
    }
    wasi_http_types_error_code_t ferr;
    wasi_http_types_static_outgoing_body_finish(out_body, NULL, &ferr);
    wasi_http_types_incoming_request_drop_own(request);
}
