//! Procedural macros for [palisade](https://docs.rs/palisade). Use them through palisade's
//! `macros` feature (`palisade::debug_handler`), not from this crate directly.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{FnArg, ItemFn, ReturnType, Token, Type};

/// The most extractors a handler takes (palisade implements `Handler` for up to five).
const MAX_EXTRACTORS: usize = 5;

/// Turns the compiler's one "is not a message handler" error into one error per cause, each
/// pointing at the argument, the return type or the signature at fault.
///
/// See `palisade::debug_handler` for the documentation and examples.
#[proc_macro_attribute]
pub fn debug_handler(attribute: TokenStream, item: TokenStream) -> TokenStream {
    let settings = match syn::parse::<Settings>(attribute) {
        Ok(settings) => settings,
        Err(error) => return error.to_compile_error().into(),
    };
    let function = match syn::parse::<ItemFn>(item.clone()) {
        Ok(function) => function,
        Err(error) => {
            let item = TokenStream2::from(item);
            let error = error.to_compile_error();
            return quote!(#item #error).into();
        }
    };
    let checks = checks(&function, &settings);
    quote!(#function #checks).into()
}

/// `#[debug_handler]` or `#[debug_handler(state = AppState)]`.
struct Settings {
    state: Option<Type>,
}

impl Parse for Settings {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.is_empty() {
            return Ok(Settings { state: None });
        }
        let key: syn::Ident = input.parse()?;
        if key != "state" {
            return Err(syn::Error::new(
                key.span(),
                "unknown setting: `#[debug_handler]` takes only `state = Type` (the router's state)",
            ));
        }
        input.parse::<Token![=]>()?;
        let state: Type = input.parse()?;
        if !input.is_empty() {
            return Err(input.error("expected nothing after `state = Type`"));
        }
        Ok(Settings { state: Some(state) })
    }
}

fn checks(function: &ItemFn, settings: &Settings) -> TokenStream2 {
    let signature = &function.sig;
    let mut errors = Vec::new();
    if signature.asyncness.is_none() {
        errors.push(syn::Error::new(
            signature.fn_token.span(),
            "a message handler must be an `async fn`",
        ));
    }
    if !signature.generics.params.is_empty() {
        errors.push(syn::Error::new(
            signature.generics.span(),
            "`#[debug_handler]` cannot check a generic function: write the handler for concrete types",
        ));
    }
    if signature.inputs.len() > MAX_EXTRACTORS {
        errors.push(syn::Error::new(
            signature.inputs.span(),
            format!(
                "a message handler takes at most {MAX_EXTRACTORS} extractors; group the rest in \
                 one extractor of your own (implement `FromRequest`)"
            ),
        ));
    }
    let mut argument_types = Vec::new();
    for input in &signature.inputs {
        match input {
            FnArg::Receiver(receiver) => errors.push(syn::Error::new(
                receiver.span(),
                "a message handler is a free function: it cannot take `self`",
            )),
            FnArg::Typed(typed) => argument_types.push(&*typed.ty),
        }
    }
    if !errors.is_empty() {
        return errors.iter().map(syn::Error::to_compile_error).collect();
    }

    let name = &signature.ident;
    let state = match &settings.state {
        Some(state) => quote!(#state),
        None => quote!(()),
    };
    let extractor_checks = argument_types.iter().enumerate().map(|(i, ty)| {
        let check = format_ident!("__palisade_extractor_{}", i);
        quote_spanned! {ty.span()=>
            #[allow(non_snake_case)]
            fn #check()
            where
                #ty: ::palisade::rpc::FromRequest<#state> + ::core::marker::Send + 'static,
            {
            }
        }
    });
    let output_span = match &signature.output {
        ReturnType::Default => signature.ident.span(),
        ReturnType::Type(_, ty) => ty.span(),
    };
    let output = match &signature.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => quote!(#ty),
    };
    let parameters: Vec<_> = (0..argument_types.len())
        .map(|i| format_ident!("argument_{}", i))
        .collect();
    // `impl Trait` may not appear in a bound: such a reply (`Streaming<impl Stream<..>>`, as
    // `Streaming`'s docs write it) is checked through the future's output instead.
    let reply_check = if names_impl_trait(output.clone()) {
        quote_spanned! {output_span=>
            #[allow(clippy::too_many_arguments)]
            fn __palisade_reply(#(#parameters: #argument_types),*) {
                fn must_reply<F, R>(_: F)
                where
                    F: ::core::future::Future<Output = R>,
                    R: ::palisade::rpc::IntoReply,
                {
                }
                must_reply(#name(#(#parameters),*));
            }
        }
    } else {
        quote_spanned! {output_span=>
            fn __palisade_reply()
            where
                #output: ::palisade::rpc::IntoReply,
            {
            }
        }
    };
    let send_check = quote_spanned! {future_span(function)=>
        #[allow(clippy::too_many_arguments)]
        fn __palisade_future_is_send(#(#parameters: #argument_types),*) {
            fn must_be_send_and_static<F: ::core::future::Future + ::core::marker::Send + 'static>(_: F) {}
            must_be_send_and_static(#name(#(#parameters),*));
        }
    };
    quote! {
        #[allow(dead_code, non_snake_case, unused_variables, clippy::all)]
        const _: () = {
            #(#extractor_checks)*
            #reply_check
            #send_check
        };
    }
}

/// Where a future that is not `Send` is reported: the signature, since the cause is in the body.
fn future_span(function: &ItemFn) -> Span {
    function.sig.ident.span()
}

/// Whether a type names `impl Trait` anywhere in it.
fn names_impl_trait(tokens: TokenStream2) -> bool {
    tokens.into_iter().any(|token| match token {
        proc_macro2::TokenTree::Ident(ident) => ident == "impl",
        proc_macro2::TokenTree::Group(group) => names_impl_trait(group.stream()),
        _ => false,
    })
}
