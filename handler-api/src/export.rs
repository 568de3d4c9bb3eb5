//! [`export_handler!`](crate::export_handler): the one line that turns a
//! [`Handler`](crate::Handler) type into a loadable wshd handler library.

/// Exports a [`Handler`](crate::Handler) type as this library's handler: the
/// library's single exported symbol, `wshd_entry_v1`.
///
/// ```ignore
/// export_handler!(Echo);
/// export_handler!(Sleepy, flags = MAY_BLOCK);
/// export_handler!(Echo, name = "echo", version = "1.2.0", flags = MAY_BLOCK);
/// ```
///
/// Options, each at most once, in any order:
///
/// * `name = "..."`: the handler name. The default is the crate's library
///   name without its `_wsh` suffix (`echo_wsh` → `echo`), which is what the
///   server expects for a file named `libecho_wsh.so`.
/// * `version = "..."`: defaults to the crate's `CARGO_PKG_VERSION`.
/// * `flags = MAY_BLOCK`: the callbacks may block, so the server runs them
///   on a separate thread pool.
/// * `handover`: the type implements [`Handover`](crate::Handover), so a
///   reload moves its open connections to the new version instead of
///   draining them (`export_handler!(Counter, handover)`).
///
/// The descriptor also carries the flags `WSHD_F_RUST_SDK` and
/// `WSHD_F_PANIC_UNWIND` and a `build_info` string (SDK version, compiler,
/// profile). A crate built with `panic = "abort"` does not compile: one
/// panicking handler would abort the whole server.
///
/// Use it once per library, at the crate root.
#[macro_export]
macro_rules! export_handler {
    // Internal rules first: `@` cannot start a type, so user input never
    // reaches them.
    (@opts $ty:ty, [$b:expr] $(,)?) => {
        $crate::export_handler!(@emit $ty, $b);
    };
    (@opts $ty:ty, [$b:expr], name = $v:expr $(, $($rest:tt)*)?) => {
        $crate::export_handler!(@opts $ty, [$b.name($v)] $(, $($rest)*)?);
    };
    (@opts $ty:ty, [$b:expr], version = $v:expr $(, $($rest:tt)*)?) => {
        $crate::export_handler!(@opts $ty, [$b.version($v)] $(, $($rest)*)?);
    };
    (@opts $ty:ty, [$b:expr], flags = $($f:ident)|+ $(, $($rest:tt)*)?) => {
        $crate::export_handler!(@opts $ty, [$b $(.flags($crate::glue::flag::$f))+] $(, $($rest)*)?);
    };
    (@opts $ty:ty, [$b:expr], handover $(, $($rest:tt)*)?) => {
        $crate::export_handler!(@opts $ty, [$b.handover()] $(, $($rest)*)?);
    };
    (@opts $ty:ty, [$b:expr], $($bad:tt)+) => {
        ::core::compile_error!(::core::concat!(
            "export_handler!: unexpected `", ::core::stringify!($($bad)+),
            "`; the options are name = \"...\", version = \"...\", flags = MAY_BLOCK and handover"
        ));
    };
    (@emit $ty:ty, $b:expr) => {
        #[cfg(panic = "abort")]
        ::core::compile_error!(
            "wshd handlers must be built with panic = \"unwind\": the server loads handlers into \
             its own process and the SDK turns a handler panic into an error (the connection \
             closes with 1011), but with panic = \"abort\" one panic would abort the whole \
             server. Remove `panic = \"abort\"` from your [profile.*] sections (and any \
             CARGO_PROFILE_*_PANIC=abort) for this crate."
        );

        const _: () = {
            static DESCRIPTOR: $crate::abi::wshd_descriptor = $b.build();

            /// The wshd ABI v1 entry point: returns this handler's static
            /// descriptor. No side effects.
            #[unsafe(no_mangle)]
            pub extern "C" fn wshd_entry_v1() -> *const $crate::abi::wshd_descriptor {
                &DESCRIPTOR
            }

            impl $crate::glue::Exported for $ty {
                fn descriptor() -> &'static $crate::abi::wshd_descriptor {
                    &DESCRIPTOR
                }
            }
        };
    };
    ($ty:ty $(, $($opts:tt)*)?) => {
        $crate::export_handler!(@opts $ty, [
            $crate::glue::Export::<$ty>::new(
                ::core::env!("CARGO_CRATE_NAME"),
                ::core::env!("CARGO_PKG_VERSION"),
                ::core::cfg!(panic = "unwind"),
            )
        ] $(, $($opts)*)?);
    };
}
