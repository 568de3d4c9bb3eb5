/*
 * wshd_handler.h — the wshd handler ABI, version 1.
 *
 * This header is the contract between the wshd server (the "host") and a
 * handler library (a shared object named NAME_wsh.so or libNAME_wsh.so).
 * The Rust SDK in handler-api/src/abi.rs mirrors it and is checked against it
 * by handler-api/tests/layout.rs, which compiles this file with a C compiler.
 *
 * ---------------------------------------------------------------------------
 * ENTRY POINT
 *   A handler library exports exactly one symbol:
 *       const wshd_descriptor *wshd_entry_v1(void);
 *   It has no side effects and returns a pointer to static, immutable data.
 *   The ABI major version is part of the symbol name, so a future v2 handler
 *   exports wshd_entry_v2 and the host can say "built for ABI 2" instead of
 *   "not a handler".
 *
 * VERSIONING
 *   - abi_major changes on any incompatible change (and renames the entry).
 *   - abi_minor grows when fields are appended to the end of a struct.  Every
 *     struct that can grow starts with (or contains) struct_size; a reader
 *     uses only the fields that fit inside min(its own sizeof, struct_size).
 *   - A handler built for minor N loads on a host with minor >= N.  A handler
 *     built for a newer minor than the host still loads; the host ignores the
 *     tail it does not know.  A host function added in a later minor is only
 *     called after checking wshd_host_api.struct_size.
 *
 * OWNERSHIP (who frees what, and for how long a pointer is valid)
 *   1. Everything the host passes INTO a callback (config text, handshake
 *      request, headers, subprotocols, message bytes, close reason) is
 *      borrowed for the duration of that call only.  Copy what you keep.
 *   2. Everything the handler passes INTO a host function (payloads, log
 *      text, header names and values, close reason) is borrowed for that call
 *      only; the host copies it before returning.  The handler never has to
 *      allocate memory for the host to free, and the host never frees handler
 *      memory.
 *   3. *out_handler (from init) and *out_conn_state (from on_open) are owned
 *      by the handler.  The host never dereferences them; it hands them back
 *      and the handler frees them in destroy / on_close.
 *   4. The wshd_host_api pointer passed to init, and its host_ctx, stay valid
 *      for the whole life of the process, even after destroy.  After destroy
 *      every host function returns WSHD_ERR_REVOKED, so a stray thread that
 *      outlives its handler gets an error, never undefined behaviour.
 *   5. The wshd_handshake pointer is valid only inside on_handshake.
 *   6. The descriptor and its strings must stay valid while the library is
 *      mapped.  The host copies the strings when it loads the library and
 *      never unmaps a handler library (it is opened with RTLD_NODELETE).
 *   Strings are UTF-8, passed as (ptr, len) and are NOT NUL-terminated.  A
 *   NULL ptr with len 0 is the empty string; wshd_handshake_req.origin uses a
 *   NULL ptr to mean "no Origin header".
 *
 * THREADING
 *   - Callbacks for ONE connection never run concurrently and always arrive in
 *     the order on_handshake -> on_open -> on_message* -> on_close.
 *     on_close is called exactly once for every on_open that returned
 *     WSHD_OK, whatever ended the connection (peer close, handler close,
 *     error, reload drain, server shutdown).
 *   - Callbacks for DIFFERENT connections may run at the same time on
 *     different threads, so the handler object must be thread-safe.
 *   - init runs before any other callback of that handler instance, destroy
 *     after the last on_close returned; neither overlaps any other callback.
 *   - Successive callbacks for one connection may run on different worker
 *     threads (each sees what the previous one wrote): keep per-connection
 *     state in *out_conn_state, not in thread-local storage.
 *   - Callbacks run on the server's async worker threads and must not block
 *     (no sleeping, no blocking I/O, no waiting on locks held for long).  A
 *     handler that needs to block sets WSHD_F_MAY_BLOCK; its callbacks then
 *     run on a separate thread pool and cannot stall other connections.
 *   - Host functions (send, ping, close, log, broadcast, and the topic and
 *     timer functions) are thread-safe, never block and never call back into
 *     the handler, so they may be called from inside a callback or from any
 *     thread the handler created.
 *   - on_timer (ABI 1.2) for a connection obeys the same rules as
 *     on_message: never concurrently with that connection's other
 *     callbacks, only between on_open and on_close, on the blocking pool for
 *     WSHD_F_MAY_BLOCK handlers.
 *   - destroy must stop and join every thread the handler started.
 *
 * CONNECTIONS
 *   A connection is a wshd_conn_id: unique for the life of the process and
 *   never reused (0 is never a valid id).  Sending to a connection that has
 *   closed returns WSHD_ERR_CLOSED.  A handler may only address connections
 *   of its own instance.
 *   Each connection's outgoing queue is bounded in messages (send_queue) and
 *   in bytes (send_queue_bytes); an empty queue always takes one message,
 *   however large.  A send past either bound returns WSHD_ERR_BACKPRESSURE;
 *   under the default slow_consumer = "close" policy the host also drops
 *   everything queued for that connection and closes it with 1008, and
 *   later sends to it return WSHD_ERR_CLOSED.
 *
 * ERRORS AND PANICS
 *   Callbacks return WSHD_OK or a negative code.  A non-OK return from
 *   on_open or on_message closes that connection with 1011 (internal error),
 *   except WSHD_ERR_LIMIT: "full, try again later" (the handler's own
 *   capacity, or a host call of the same callback refused with
 *   WSHD_ERR_LIMIT, which the host also recognises when the callback then
 *   fails with any code but WSHD_ERR_PANIC).  That closes with 1013 and is
 *   not counted against the version by canary rollback or quarantine;
 *   neither is a handshake rejected with 503.  A non-OK return from init discards the new instance and, on a reload,
 *   keeps the previous version serving.  C and C++ handlers must never let an
 *   exception or a longjmp cross a callback.  Rust handlers built with the SDK
 *   catch panics in every callback and return WSHD_ERR_PANIC.
 * ---------------------------------------------------------------------------
 */
#ifndef WSHD_HANDLER_H
#define WSHD_HANDLER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The bytes "WSHD" read as a little-endian u32. */
#define WSHD_MAGIC 0x44485357u
#define WSHD_ABI_MAJOR 1u
#define WSHD_ABI_MINOR 2u
#define WSHD_ENTRY_SYMBOL "wshd_entry_v1"

typedef uint64_t wshd_conn_id;

/* Borrowed UTF-8 text; see OWNERSHIP. */
typedef struct wshd_str {
  const char *ptr;
  size_t len;
} wshd_str;

typedef struct wshd_header {
  wshd_str name;
  wshd_str value;
} wshd_header;

/* Status codes returned by callbacks and host functions. */
enum {
  WSHD_OK = 0,
  WSHD_ERR_CLOSED = -1,       /* the connection is closed or is not yours */
  WSHD_ERR_BACKPRESSURE = -2, /* the connection's send queue is full */
  WSHD_ERR_INVALID = -3,      /* bad argument: invalid UTF-8, bad close code, bad header */
  WSHD_ERR_STATE = -4,        /* not allowed now (e.g. a second subprotocol choice) */
  WSHD_ERR_REVOKED = -5,      /* this handler instance was destroyed */
  WSHD_ERR_UNSUPPORTED = -6,  /* the host is too old for this function */
  WSHD_ERR_LIMIT = -7,        /* ABI 1.2: a configured cap was reached (topics, timers) */
  WSHD_ERR_PANIC = -100,      /* the handler panicked (Rust SDK) */
  WSHD_ERR_HANDLER = -101     /* the handler reports a failure of its own */
};

enum { WSHD_MSG_TEXT = 1, WSHD_MSG_BINARY = 2 };
/* OR into the kind of send/broadcast/publish: never compress this message
   (permessage-deflate). Older hosts refuse it with WSHD_ERR_INVALID. */
enum { WSHD_SEND_NO_COMPRESS = 1 << 8 };

enum {
  WSHD_LOG_ERROR = 1,
  WSHD_LOG_WARN = 2,
  WSHD_LOG_INFO = 3,
  WSHD_LOG_DEBUG = 4,
  WSHD_LOG_TRACE = 5
};

/* Descriptor flags. */
#define WSHD_F_MAY_BLOCK (1u << 0)    /* run my callbacks off the async workers */
#define WSHD_F_PANIC_UNWIND (1u << 1) /* Rust SDK: built with panic=unwind, panics are caught */
#define WSHD_F_RUST_SDK (1u << 2)     /* built with the Rust SDK (then PANIC_UNWIND is required) */

/* Opaque host object; valid only inside on_handshake. */
typedef struct wshd_handshake wshd_handshake;

/* What a client asked for in its opening handshake.  Borrowed for the call. */
typedef struct wshd_handshake_req {
  uint32_t struct_size;
  uint32_t reserved;           /* zero */
  wshd_conn_id conn;           /* the id the connection gets if accepted */
  wshd_str path;               /* the route's request path, without the query */
  wshd_str query;              /* the query string without '?', possibly empty */
  wshd_str origin;             /* the Origin header; ptr == NULL if absent */
  wshd_str remote_addr;        /* peer address as "ip:port" */
  const wshd_header *headers;  /* every request header, in arrival order */
  size_t n_headers;
  const wshd_str *subprotocols; /* Sec-WebSocket-Protocol offer, in order */
  size_t n_subprotocols;
} wshd_handshake_req;

/* The host's function table.  Valid for the life of the process. */
typedef struct wshd_host_api {
  uint32_t struct_size;
  uint16_t abi_major;
  uint16_t abi_minor;
  void *host_ctx; /* pass as the ctx argument below */

  /* Queue a text (WSHD_MSG_TEXT, must be UTF-8) or binary message. */
  int32_t (*send)(void *ctx, wshd_conn_id conn, uint32_t kind, const uint8_t *data, size_t len);
  /* Queue a ping; at most 125 bytes of payload. */
  int32_t (*ping)(void *ctx, wshd_conn_id conn, const uint8_t *data, size_t len);
  /* Start a close handshake: code 1000 or 3000-4999 (or 1001-1014 where the
   * RFC allows a sender to use it); reason at most 123 bytes of UTF-8. */
  int32_t (*close)(void *ctx, wshd_conn_id conn, uint16_t code, wshd_str reason);
  /* Write to the server's log.  target is a free-form module name. */
  void (*log)(void *ctx, uint32_t level, wshd_str target, wshd_str msg);

  /* Handshake builders; call only inside on_handshake. */
  /* Accept the offered subprotocol at this index of req->subprotocols. */
  int32_t (*hs_select_subprotocol)(wshd_handshake *hs, size_t index);
  /* Add a response header.  Hop-by-hop and Sec-WebSocket-* names are refused. */
  int32_t (*hs_add_header)(wshd_handshake *hs, wshd_str name, wshd_str value);
  /* Refuse the upgrade with an HTTP status in 400..599 and a text body. */
  int32_t (*hs_reject)(wshd_handshake *hs, uint16_t http_status, wshd_str body);

  /* ABI 1.1.  The most verbose level the host writes to its log right now
   * (WSHD_LOG_ERROR .. WSHD_LOG_TRACE), or 0 if it writes none.  Lines above
   * it are dropped, so a handler can skip building them.  The answer can
   * change when the server's config is reloaded.  A host of ABI 1.0 has no
   * such field: call it only if host->struct_size >= WSHD_HOST_API_SIZE_1_1. */
  uint32_t (*log_level)(void *ctx);

  /* ABI 1.2.  Queue one text or binary message to each of the n connections
   * in conns, storing the payload once: every recipient's queue holds a
   * reference to the same bytes.  Each listed id gets what send would give
   * it: unknown, closed or foreign ids are skipped, and each delivery obeys
   * that connection's own queue bounds and slow-consumer policy, so one slow
   * recipient never holds up the others.  An id listed twice gets the
   * message twice.  The calling connection, inside its own callback, gets
   * it in order with its other sends of that callback, as with send.
   * Returns WSHD_OK (even if nothing was delivered), WSHD_ERR_INVALID (bad
   * kind, text that is not UTF-8, NULL conns or data with a nonzero count)
   * or WSHD_ERR_REVOKED; if delivered is not NULL it receives the number of
   * connections the message was queued to.  A host of ABI 1.0 or 1.1 has no
   * such field: call it only if host->struct_size >= WSHD_HOST_API_SIZE_1_2,
   * and otherwise fall back to one send per connection. */
  int32_t (*broadcast)(void *ctx, const wshd_conn_id *conns, size_t n, uint32_t kind,
                       const uint8_t *data, size_t len, size_t *delivered);

  /* ABI 1.2: TOPICS.  The host keeps the subscriptions, keyed by topic name,
   * one namespace per server: a topic outlives every handler version, and a
   * publish reaches subscribers on every route and every loaded version.  A
   * topic is 1..256 bytes of UTF-8 (else WSHD_ERR_INVALID).  A connection's
   * subscriptions end when it closes.  Caps (topics per connection, topics
   * on the server) are set by the operator; past one, WSHD_ERR_LIMIT.
   * Available when host->struct_size >= WSHD_HOST_API_SIZE_1_2, like
   * broadcast. */
  /* Subscribe conn (one of this instance's open connections, else
   * WSHD_ERR_CLOSED) to topic.  Subscribing twice is one subscription. */
  int32_t (*subscribe)(void *ctx, wshd_conn_id conn, wshd_str topic);
  /* End conn's subscription; WSHD_OK also if it had none. */
  int32_t (*unsubscribe)(void *ctx, wshd_conn_id conn, wshd_str topic);
  /* 1 if conn is subscribed to topic, 0 if not, or a negative status. */
  int32_t (*is_subscribed)(void *ctx, wshd_conn_id conn, wshd_str topic);
  /* Queue one text or binary message to every subscriber of topic except
   * exclude (0: none), whatever route or handler version it is on.  The
   * payload is stored once and shared by every recipient's queue; each
   * delivery obeys that subscriber's queue bounds and slow-consumer policy,
   * so a slow subscriber never delays the others or the caller.  All
   * subscribers of a topic see its publishes in the same order, except
   * that inside a callback the callback's own connection gets the message
   * in order with that callback's sends (it goes out when the callback
   * returns, possibly ahead of a publish another thread made just
   * before).  Returns
   * the number of subscribers the message was queued to (0 for a topic
   * nobody has subscribed to), or WSHD_ERR_INVALID / WSHD_ERR_REVOKED. */
  int64_t (*publish)(void *ctx, wshd_str topic, uint32_t kind, const uint8_t *data, size_t len,
                     wshd_conn_id exclude);
  /* The number of subscribers of topic on this server, or a negative status. */
  int64_t (*subscribers)(void *ctx, wshd_str topic);

  /* ABI 1.2: TIMERS.  Call the descriptor's on_timer once, delay_ms
   * milliseconds from now, for connection conn (then in order with its
   * other callbacks) or, with conn 0, for the instance (conn_state NULL).
   * Returns the timer id (> 0) or a negative status: WSHD_ERR_CLOSED (conn
   * not one of this instance's open connections), WSHD_ERR_LIMIT (too many
   * pending timers for that connection or instance), WSHD_ERR_UNSUPPORTED
   * (the descriptor has no on_timer).  A connection's timers are dropped
   * when it closes; an instance's when it is destroyed: a timer never fires
   * into another handler version. */
  int64_t (*set_timer)(void *ctx, wshd_conn_id conn, uint64_t delay_ms);
  /* Cancel a pending timer: WSHD_OK and on_timer will not be called for it,
   * or WSHD_ERR_STATE if it is not pending (fired, cancelled, unknown). */
  int32_t (*cancel_timer)(void *ctx, uint64_t timer_id);

  /* ABI 1.2: the number of subscribers of topic across every node of a
   * cluster ([cluster] in the server's config), or a negative status.
   * Approximate: this node's exact count plus the other nodes' counts as
   * last exchanged (every few seconds, for topics with a subscriber on this
   * node).  Without a cluster, the same as subscribers().  Never waits on
   * the network. */
  int64_t (*subscribers_cluster)(void *ctx, wshd_str topic);
} wshd_host_api;

/* struct_size of a host table that has log_level (ABI 1.1 and later). */
#define WSHD_HOST_API_SIZE_1_1 (offsetof(wshd_host_api, log_level) + sizeof(uint32_t (*)(void *)))
/* struct_size of an ABI 1.2 host table: broadcast and the topic and timer
 * functions (ABI 1.2 and later). */
#define WSHD_HOST_API_SIZE_1_2                                                                     \
  (offsetof(wshd_host_api, subscribers_cluster) + sizeof(int64_t (*)(void *, wshd_str)))

/* ABI 1.2, CONNECTION HANDOVER.  The host-owned buffer on_export writes a
 * connection's state into, valid only during that call.  Append bytes with
 * out->write(out, data, len): WSHD_OK, or WSHD_ERR_LIMIT (nothing appended)
 * once the total would pass max_len ([reload] handover_max_bytes); the
 * export then fails and the connection stays on its version. */
typedef struct wshd_export_out {
  void *host_buf; /* opaque */
  int32_t (*write)(struct wshd_export_out *out, const uint8_t *data, size_t len);
  size_t max_len;
} wshd_export_out;

typedef struct wshd_descriptor {
  uint32_t magic;      /* WSHD_MAGIC */
  uint16_t abi_major;  /* WSHD_ABI_MAJOR the handler was built against */
  uint16_t abi_minor;  /* WSHD_ABI_MINOR the handler was built against */
  uint32_t struct_size; /* sizeof(wshd_descriptor) as the handler saw it */
  uint32_t flags;      /* WSHD_F_* */
  wshd_str name;       /* e.g. "echo" */
  wshd_str version;    /* e.g. "1.2.0" */
  wshd_str build_info; /* free text: SDK version, compiler; for diagnostics */

  /* Required.  Create one handler instance for one route.  config is the
   * route's [route.config] table rendered as TOML text (empty if none).
   * On failure, log why through host->log and return non-OK. */
  int32_t (*init)(const wshd_host_api *host, wshd_str config, void **out_handler);
  /* Optional (NULL accepts every handshake with no subprotocol). */
  int32_t (*on_handshake)(void *handler, const wshd_handshake_req *req, wshd_handshake *hs);
  /* Optional.  *out_conn_state starts as NULL. */
  int32_t (*on_open)(void *handler, wshd_conn_id conn, void **out_conn_state);
  /* Required.  kind is WSHD_MSG_TEXT (valid UTF-8) or WSHD_MSG_BINARY. */
  int32_t (*on_message)(void *handler, void *conn_state, wshd_conn_id conn, uint32_t kind,
                        const uint8_t *data, size_t len);
  /* Optional.  code is 1005 if the peer sent no code, 1006 if the
   * connection dropped without a close frame.  Free conn_state here. */
  void (*on_close)(void *handler, void *conn_state, wshd_conn_id conn, uint16_t code,
                   wshd_str reason);
  /* Optional.  Free the handler and join its threads. */
  void (*destroy)(void *handler);

  /* ABI 1.2, optional.  A timer set with host->set_timer fired.  For a
   * connection's timer, conn_state and conn are that connection's, and a
   * non-OK return closes it with 1011, as from on_message; for an
   * instance's timer they are NULL and 0.  A host of ABI 1.0 or 1.1 never
   * reads this field (set struct_size = sizeof(wshd_descriptor)). */
  int32_t (*on_timer)(void *handler, void *conn_state, wshd_conn_id conn, uint64_t timer_id);

  /* ABI 1.2, optional, both or neither: CONNECTION HANDOVER (docs/abi.md).
   * When a new version of a route replaces this one and both have these
   * callbacks, each open connection moves between two of its callbacks:
   * the old version's on_export writes its state into out, the new
   * version's on_import rebuilds it (data is borrowed for the call), then
   * the old version's on_export is called once more with out == NULL: free
   * conn_state, the connection is gone from this version (no on_close; its
   * timers were dropped; sends to it from this version get
   * WSHD_ERR_CLOSED).  A non-OK on_export or on_import leaves the
   * connection on the old version, which then drains it as without
   * handover.  A host that predates these fields never reads them. */
  int32_t (*on_export)(void *handler, void *conn_state, wshd_conn_id conn, wshd_export_out *out);
  int32_t (*on_import)(void *handler, wshd_conn_id conn, const uint8_t *data, size_t len,
                       void **out_conn_state);
} wshd_descriptor;

/* struct_size of an ABI 1.0 or 1.1 descriptor (everything before on_timer). */
#define WSHD_DESCRIPTOR_SIZE_1_0 (offsetof(wshd_descriptor, on_timer))
/* struct_size of a descriptor that has on_timer (ABI 1.2 and later). */
#define WSHD_DESCRIPTOR_SIZE_1_2                                                                   \
  (offsetof(wshd_descriptor, on_timer) +                                                           \
   sizeof(int32_t (*)(void *, void *, wshd_conn_id, uint64_t)))

/* struct_size of a descriptor that has on_export and on_import (all of 1.2). */
#define WSHD_DESCRIPTOR_SIZE_HANDOVER                                                              \
  (offsetof(wshd_descriptor, on_import) +                                                          \
   sizeof(int32_t (*)(void *, wshd_conn_id, const uint8_t *, size_t, void **)))

/* The only symbol a handler exports. */
const wshd_descriptor *wshd_entry_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* WSHD_HANDLER_H */
