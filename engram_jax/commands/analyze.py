"""``engram-jax analyze``: the paper's analyses of trained workdirs (ENGRAM_SPEC section 9).

  logitlens    KL(final || block l read out through the final norm and LM head) per block,
               averaged over validation tokens; JSON + PNG (one curve per workdir).
  cka          linear CKA (unbiased HSIC, minibatched) between every block of two models and
               the soft alignment index (CKA-weighted centroid of the top-5 blocks); JSON + PNG.
  gates        per-token Engram gate heatmap of a text (rows: Engram layer x branch); PNG.
  sensitivity  validation loss with every Engram output zeroed vs normal, per data source;
               JSON on stdout.

Validation batches are the run's own (``engram-jax train`` split); ``--data`` files are
tokenized with the run's tokenizer and split the same way.
"""

from __future__ import annotations

from engram_jax.commands import add_command


def add_parser(sub) -> None:
    p = add_command(sub, "analyze", "LogitLens, CKA, gate maps and Engram sensitivity", __doc__)
    kinds = p.add_subparsers(dest="analysis", required=True)

    lens = kinds.add_parser("logitlens", help="KL to the final distribution per block")
    lens.add_argument("--workdir", required=True)
    lens.add_argument("--compare", default=None, help="a second workdir (e.g. the baseline)")
    lens.add_argument("--out", required=True, help="FILE.json (the plot goes to FILE.png)")
    lens.add_argument("--batches", type=int, default=4)

    cka = kinds.add_parser("cka", help="CKA between every block pair of two models")
    cka.add_argument("--workdir", required=True)
    cka.add_argument("--compare", required=True)
    cka.add_argument("--out", required=True, help="FILE.json (heatmap goes to FILE.png)")
    cka.add_argument("--batches", type=int, default=4, help="minibatches (validation batches)")
    cka.add_argument("--tokens", type=int, default=1024, help="tokens per minibatch")
    cka.add_argument("--top-k", type=int, default=5)

    gates = kinds.add_parser("gates", help="per-token gate heatmap of a text")
    gates.add_argument("--workdir", required=True)
    gates.add_argument("--text", required=True)
    gates.add_argument("--out", required=True, help="FILE.png (values also in FILE.json)")
    gates.add_argument("--max-tokens", type=int, default=160)

    sens = kinds.add_parser("sensitivity", help="loss with the Engram output zeroed")
    sens.add_argument("--workdir", required=True)
    sens.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="data sources (default: the run's own validation split)",
    )
    sens.add_argument("--batches", type=int, default=4)
    for sp in (lens, cka, gates, sens):
        sp.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
        sp.set_defaults(func=run)


def _png_next_to(out: str) -> str:
    import os

    root, _ = os.path.splitext(out)
    return root + ".png"


def _write_json(path: str, obj) -> None:
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _load(workdir: str, step):
    from engram_jax.workdir import Workdir

    return Workdir(workdir).load_model(step)


def _paired(args, cfg_a):
    """W's validation batches and the same tokens hashed for the --compare model."""
    from engram_jax import analysis as an
    from engram_jax.workdir import Workdir

    cfg_b, model_b = _load(args.compare, None)
    batches, tok = an.validation_batches(cfg_a, args.workdir, args.batches)
    tok_b = Workdir(args.compare).tokenizer()
    if an.tokenizer_digest(tok) != an.tokenizer_digest(tok_b):
        raise ValueError(
            f"{args.workdir} and {args.compare} use different tokenizers; "
            "the analyses compare models on the same tokens"
        )
    return batches, an.rehash(batches, cfg_b, tok), model_b


def run_logitlens(args) -> dict:
    from engram_jax import analysis as an
    from engram_jax.analysis_plots import plot_logit_lens

    cfg, model = _load(args.workdir, args.step)
    result = {"workdir": args.workdir}
    if args.compare:
        batches, batches_b, model_b = _paired(args, cfg)
        result["compare"] = args.compare
        result["compare_kl"] = an.logit_lens(model_b, batches_b)["kl"]
    else:
        batches, _ = an.validation_batches(cfg, args.workdir, args.batches)
    lens = an.logit_lens(model, batches)
    result.update(kl=lens["kl"], tokens=lens["tokens"])
    curves = {args.workdir: result["kl"]}
    if args.compare:
        curves[args.compare] = result["compare_kl"]
    result["png"] = _png_next_to(args.out)
    _write_json(args.out, result)
    plot_logit_lens(curves, result["png"])
    return result


def run_cka(args) -> dict:
    from engram_jax import analysis as an
    from engram_jax.analysis_plots import plot_cka

    cfg, model = _load(args.workdir, args.step)
    batches, batches_b, model_b = _paired(args, cfg)
    cka = an.cka_matrix(model, model_b, batches, batches_b, max_tokens=args.tokens)
    align = an.soft_alignment(cka, args.top_k)
    result = {
        "workdir": args.workdir,
        "compare": args.compare,
        "minibatches": len(batches),
        "tokens_per_minibatch": args.tokens,
        "cka": cka.tolist(),
        "soft_alignment": align.tolist(),
        "top_k": args.top_k,
        "png": _png_next_to(args.out),
    }
    _write_json(args.out, result)
    plot_cka(cka, align, result["png"], label_a=args.workdir, label_b=args.compare)
    return result


def run_gates(args) -> dict:
    import os

    import numpy as np

    from engram_jax import analysis as an
    from engram_jax.analysis_plots import plot_gates, token_label
    from engram_jax.generate import load_workdir

    cfg, model, sp, comp = load_workdir(args.workdir, args.step)
    if not model.engram_layers:
        raise ValueError(f"{args.workdir} has no Engram layers")
    ids = sp.encode(args.text)[: args.max_tokens]
    if len(ids) < 1:
        raise ValueError("--text encodes to no tokens")
    hasher = comp.hasher(cfg.engram)
    tokens = np.asarray([ids], np.int32)
    g = an.gates(model, tokens, hasher(comp(tokens)))
    labels = [token_label(sp.decode([i])) for i in ids]
    plot_gates({k: v[0] for k, v in g.items()}, labels, args.out)
    result = {
        "workdir": args.workdir,
        "png": args.out,
        "tokens": labels,
        "gates": {str(k): v[0].tolist() for k, v in g.items()},
    }
    _write_json(os.path.splitext(args.out)[0] + ".json", result)
    return {k: v for k, v in result.items() if k != "gates"}


def run_sensitivity(args) -> dict:
    from engram_jax import analysis as an

    cfg, model = _load(args.workdir, args.step)
    if not model.engram_layers:
        raise ValueError(f"{args.workdir} has no Engram layers")
    out = {"workdir": args.workdir, "sources": {}}
    for data in args.data or [None]:
        batches, _ = an.validation_batches(cfg, args.workdir, args.batches, data=data)
        name = data or (cfg.data.path or "<run validation split>")
        out["sources"][name] = an.engram_sensitivity(model, batches)
    return out


def run(args) -> int:
    import json

    fn = {
        "logitlens": run_logitlens,
        "cka": run_cka,
        "gates": run_gates,
        "sensitivity": run_sensitivity,
    }[args.analysis]
    result = fn(args)
    print(json.dumps(result))
    return 0
