"""The `zen-eco` command: run, chat, info, init, bench, quantize, perplexity.

Flags follow llama.cpp where it has one (-m, -n, -t, -c, --temp, --top-k, --top-p, --min-p,
--repeat-penalty, --seed). Errors we raise on purpose (ZenError) print one line and exit 1;
heavy imports happen inside commands so `zen-eco --help` is instant.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Run Zen-Eco and other small decoder LLMs (GGUF or Hugging Face safetensors) on your own hardware.",
)

ModelOpt = typer.Option("default", "-m", "--model", help="GGUF file, Hugging Face directory, Hub id, 'default' "
                        "(bundled SmolLM2-135M-Instruct) or 'gemma3-270m' (Gemma-3-270M Q4_K_M, its part packages).")
MaxTokensOpt = typer.Option(256, "-n", "--max-tokens", help="Most tokens to generate.")
# Not given: 0.8 / 40 / 0.95 / 0.05, or for models with thinking tokens Qwen3's per-mode values
# (thinking 0.6 / 20 / 0.95 / 0; non-thinking 0.7 / 20 / 0.8 / 0), see engine.sampling.mode_defaults.
_MODE = "thinking models: per mode"
TempOpt = typer.Option(None, "--temperature", "--temp", show_default=False,
                       help=f"Sampling temperature; 0 = greedy. [default: 0.8; {_MODE}, 0.6 thinking / 0.7 not]")
TopKOpt = typer.Option(None, "--top-k", show_default=False,
                       help=f"Keep the k most likely tokens; 0 = off. [default: 40; {_MODE}, 20]")
TopPOpt = typer.Option(None, "--top-p", show_default=False,
                       help=f"Nucleus sampling mass; 1.0 = off. [default: 0.95; {_MODE}, 0.95 thinking / 0.8 not]")
MinPOpt = typer.Option(None, "--min-p", show_default=False,
                       help=f"Drop tokens below min_p x the top probability; 0 = off. [default: 0.05; {_MODE}, 0]")
RepeatOpt = typer.Option(1.0, "--repeat-penalty", "--repetition-penalty", help="CTRL-style penalty on tokens already seen; 1.0 = off.")
PresenceOpt = typer.Option(0.0, "--presence-penalty", help="OpenAI presence penalty on generated tokens.")
FrequencyOpt = typer.Option(0.0, "--frequency-penalty", help="OpenAI frequency penalty on generated tokens.")
SeedOpt = typer.Option(None, "--seed", "-s", help="Random seed; same seed, same output.")
ThreadsOpt = typer.Option(None, "-t", "--threads", help="CPU threads (default: PyTorch's, one per core).")
CtxOpt = typer.Option(None, "-c", "--ctx-size", help="Context window in tokens (default: the model's).")
DtypeOpt = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
CompileOpt = typer.Option(False, "--compile", help="torch.compile the batch-1 decode step (CUDA: ~1.7x, "
                          "CPU: ~1.25x faster decode after a one-off compile of ~35-60 s: for long runs).")
QuantOpt = typer.Option("auto", "--quant", help="auto: a quantized checkpoint as stored, a GGUF's Q4_x (int4), Q5_x (5-bit) and Q8_0/Q6_K/Q3_K (int8) "
                        "weights kept packed where our kernels run (CPU; with --dtype auto or bfloat16), "
                        "its Q4_K/Q5_K/Q6_K as stored where the CPU has "
                        "AVX-512 VNNI or AVX2; none: dequantize all; int8, int4 (group 32), int4-g64, int4-g128: "
                        "quantize the layers' weights while loading.")
KvCacheOpt = typer.Option("bf16", "--kv-cache", help="How the KV cache stores keys and values: bf16 (the model's dtype), "
                          "int8, int4, k4v2 (4-bit keys, 2-bit values) or int2 (KIVI-style 2-bit); see README, Long context.")
SystemOpt = typer.Option(None, "--system", help="System prompt.")
StopOpt = typer.Option(None, "--stop", help="Stop string (repeatable).")
ThinkOpt = typer.Option(None, "--think/--no-think", show_default=False,
                        help="Thinking mode for models with <think> tokens (Zen-Eco, Qwen3). [default: on; "
                             "/think and /no_think in a message switch it]")
BudgetOpt = typer.Option(None, "--thinking-budget", metavar="N",
                         help="Most thinking tokens before the model is made to answer; 0 = no thinking.")
HideOpt = typer.Option(False, "--hide-thinking", help="Print only the answer, not the thinking.")


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed,
              thinking_budget=None) -> dict:
    """The sampling keywords the user gave (flags left out are filled per thinking mode by the API),
    checked now so that bad flags fail before the model loads."""
    from .engine.sampling import params_for_mode
    from .engine.thinking import check_thinking_budget

    check_thinking_budget(thinking_budget)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    kwargs = {k: v for k, v in given.items() if v is not None}
    kwargs.update(repetition_penalty=repeat_penalty, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, seed=seed)
    params_for_mode(None, **kwargs)
    return kwargs


class _ThinkingPrinter:
    """Writes a stream's chunks to stdout: the thinking first (dimmed on a terminal; between <think>
    and </think> lines when piped, so it stays apart from the answer; left out with --hide-thinking),
    then the answer. `content` collects the answer's pieces."""

    def __init__(self, hide: bool) -> None:
        from rich.console import Console

        self.hide = hide
        self.tty = sys.stdout.isatty()
        self.console = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
        self.thinking = False  # inside a shown thinking block
        self.content: list[str] = []

    def _end_thinking(self) -> None:
        if self.thinking:
            sys.stdout.write("\n\n" if self.tty else "\n</think>\n\n")
            self.thinking = False

    def write(self, chunk) -> None:
        if chunk.reasoning and not self.hide:
            if not self.thinking and not self.content:
                self.thinking = True
                if not self.tty:
                    sys.stdout.write("<think>\n")
            if self.tty:
                self.console.print(chunk.reasoning, style="dim", end="")
            else:
                sys.stdout.write(chunk.reasoning)
        if chunk.content:
            self._end_thinking()
            self.content.append(chunk.content)
            sys.stdout.write(chunk.content)
        sys.stdout.flush()

    def end(self) -> None:
        if self.thinking and not self.tty:
            sys.stdout.write("\n</think>")
        self.thinking = False
        sys.stdout.write("\n")
        sys.stdout.flush()


def _build_notice(name: str) -> None:
    from rich.console import Console

    from .native import build_dir

    Console(stderr=True).print(f"[dim]building the {name} kernel for this CPU (once; cached in {build_dir()})[/dim]",
                               soft_wrap=True)


def _load(model, dtype, device, ctx_size, threads, quant, kv_cache="bf16"):
    from .api import freeze_heap, load

    zm = load(model, dtype=dtype, device=device, context=ctx_size, threads=threads, progress=sys.stderr.isatty(),
              quant=quant, kv_cache=kv_cache)
    freeze_heap()
    return zm


def _stats(chunk) -> str:
    return (f"prompt {chunk.prompt_tokens} tok at {chunk.prompt_tps:.1f} tok/s, generated {chunk.generation_tokens} tok "
            f"at {chunk.generation_tps:.1f} tok/s, first token {chunk.time_to_first_token * 1000:.0f} ms")


@app.command()
def run(
    prompt: str = typer.Argument(..., help="The prompt. Chat models get it as a user message through their chat template."),
    model: str = ModelOpt, max_tokens: int = MaxTokensOpt, temperature: float = TempOpt, top_k: int = TopKOpt,
    top_p: float = TopPOpt, min_p: float = MinPOpt, repeat_penalty: float = RepeatOpt,
    presence_penalty: float = PresenceOpt, frequency_penalty: float = FrequencyOpt, seed: Optional[int] = SeedOpt,
    threads: Optional[int] = ThreadsOpt, ctx_size: Optional[int] = CtxOpt, dtype: str = DtypeOpt,
    device: str = DeviceOpt, quant: str = QuantOpt, kv_cache: str = KvCacheOpt, system: Optional[str] = SystemOpt,
    stop: Optional[list[str]] = StopOpt,
    raw: bool = typer.Option(False, "--raw", help="Continue the prompt as plain text, without the chat template."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Print speed figures to stderr at the end."),
    think: Optional[bool] = ThinkOpt, thinking_budget: Optional[int] = BudgetOpt, hide_thinking: bool = HideOpt,
) -> None:
    """Generate one answer to PROMPT and stream it to the terminal."""
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed,
                       thinking_budget)
    zm = _load(model, dtype, device, ctx_size, threads, quant, kv_cache)
    thinking = dict(enable_thinking=think, thinking_budget=thinking_budget)
    if raw or zm.tokenizer.chat_template is None:
        chunks = zm.generate(prompt, max_tokens, stream=True, stop=stop or (), **thinking, **params)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        chunks = zm.chat(messages, max_tokens, stream=True, stop=stop or (), **thinking, **params)
    last, out = None, _ThinkingPrinter(hide_thinking)
    for last in chunks:
        out.write(last)
    out.end()
    if verbose and last is not None:
        typer.echo(_stats(last), err=True)


@app.command()
def chat(
    model: str = ModelOpt, max_tokens: int = typer.Option(512, "-n", "--max-tokens", help="Most tokens per answer."),
    temperature: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt, presence_penalty: float = PresenceOpt, frequency_penalty: float = FrequencyOpt,
    seed: Optional[int] = SeedOpt, threads: Optional[int] = ThreadsOpt, ctx_size: Optional[int] = CtxOpt,
    dtype: str = DtypeOpt, device: str = DeviceOpt, quant: str = QuantOpt, kv_cache: str = KvCacheOpt,
    system: Optional[str] = SystemOpt, think: Optional[bool] = ThinkOpt, thinking_budget: Optional[int] = BudgetOpt, hide_thinking: bool = HideOpt,
) -> None:
    """Talk with the model. History is kept (and its KV cache reused); /clear forgets it, /exit or Ctrl-D leaves.

    Thinking models show their thinking dimmed (--hide-thinking leaves it out); only answers are kept
    in the history. Type /think or /no_think in a message to switch thinking from then on."""
    from rich.console import Console

    from .errors import ZenError

    console = Console(stderr=True)
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed,
                       thinking_budget)
    zm = _load(model, dtype, device, ctx_size, threads, quant, kv_cache)
    if zm.tokenizer.chat_template is None:
        raise ZenError(f"{zm.path} has no chat template; use `zen-eco run --raw` for plain completion")
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    console.print(f"[dim]{zm.path} — /clear to forget, /exit to leave[/dim]")
    while True:
        try:
            user = input(">>> ")
        except EOFError:
            break
        if user.strip() in ("/exit", "/quit", "/bye"):
            break
        if user.strip() == "/clear":
            history = list(base)
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        last, out = None, _ThinkingPrinter(hide_thinking)
        try:
            for last in zm.chat(history, max_tokens, stream=True, enable_thinking=think,
                                thinking_budget=thinking_budget, **params):
                out.write(last)
        except KeyboardInterrupt:
            pass
        out.end()
        # only the answer is kept: earlier turns' thinking is dropped (as Qwen3's template does anyway)
        history.append({"role": "assistant", "content": "".join(out.content)})
        if last is not None:
            console.print(f"[dim]{_stats(last)}, {last.reused_prompt_tokens} prompt tokens reused[/dim]", soft_wrap=True)


@app.command()
def info(model: str = typer.Argument("default", help="Model reference or preset name.")) -> None:
    """Describe a model or preset: architecture, shape, parameter count, format, tokenizer."""
    from .info import describe

    typer.echo(describe(model))


@app.command()
def init(
    preset: str = typer.Argument(..., help="Preset name (zen-eco info lists them: zen-eco-4b, zen-eco-tiny, llama-tiny)."),
    output: str = typer.Option(..., "-o", "--output", help="Directory to write (config.json + safetensors)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32, bfloat16 or float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a random-initialised checkpoint of a preset in Hugging Face format (for tests and benchmarks)."""
    from .init import init_checkpoint

    path = init_checkpoint(preset, output, dtype=dtype, seed=seed, progress=sys.stderr.isatty())
    typer.echo(str(path))


@app.command()
def bench(
    model: str = typer.Argument("default", help="Model reference."),
    prompt_tokens: int = typer.Option(512, "-p", "--prompt-tokens", help="Prompt length for the prefill figure."),
    gen_tokens: int = typer.Option(128, "-n", "--gen-tokens", help="Tokens to decode for the decode figure."),
    threads: Optional[int] = ThreadsOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, quant: str = QuantOpt,
    kv_cache: str = KvCacheOpt, repeats: int = typer.Option(3, "-r", "--repeats", help="Runs per figure; the best is reported."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs",
                                     help="On CUDA, replay each decode step as a recorded graph."),
    compile: bool = CompileOpt,
    native_step: bool = typer.Option(True, "--native-step/--no-native-step",
                                     help="On the CPU, run each decode step as one C call instead of the PyTorch forward."),
) -> None:
    """Measure prefill tok/s, decode tok/s, time to first token and peak RSS."""
    from .bench import run_bench

    run_bench(model, prompt_tokens, gen_tokens, threads, dtype, device, repeats, json_out, quant, kv_cache,
              cuda_graphs, compile, native_step)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Hugging Face directory (config.json + safetensors) or Hub id."),
    to: str = typer.Option(..., "--to", help="int8 (per output channel, symmetric) or int4 (groups, asymmetric)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="int4 group size: 32 (default), 64 or 128."),
    output: str = typer.Option(..., "-o", "--output", help="Directory to write; must not exist or be empty."),
) -> None:
    """Write a weight-only INT8/INT4 checkpoint (safetensors + quantization_config) that loads without re-quantizing."""
    from .quantize import quantize_checkpoint

    typer.echo(str(quantize_checkpoint(model, output, to, group_size, progress=sys.stderr.isatty())))


@app.command()
def perplexity(
    model: str = typer.Argument("default", help="Model reference."),
    ctx: int = typer.Option(512, "--ctx", "-c", help="Window length in tokens; each window is scored on its second half."),
    tokens: int = typer.Option(32768, "--tokens", help="Use the first N tokens of the text."),
    text: Optional[str] = typer.Option(None, "--text", help="Text file, plain or .gz (default: WikiText-2 test, ../shared/data/wikitext2_test.raw.gz)."),
    threads: Optional[int] = ThreadsOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, quant: str = QuantOpt,
) -> None:
    """Perplexity over consecutive CTX-token windows, computed the way llama.cpp's llama-perplexity does."""
    from .perplexity import default_text_path, perplexity as run_perplexity, read_text

    body = read_text(text if text is not None else default_text_path())  # before the model: fail fast
    zm = _load(model, dtype, device, None, threads, quant)
    typer.echo(str(run_perplexity(zm, body, ctx, tokens, progress=sys.stderr.isatty())))


@app.command()
def serve(
    model_arg: Optional[str] = typer.Argument(None, metavar="[MODEL]", show_default=False,
                                              help="Model reference (the same as -m)."),
    model: str = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 serves every interface."),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 = any free one."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="ZEN_ECO_API_KEY", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on /v1 and /api routes."),
    cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", show_default=False,
                                                    help="Browser origin allowed to call the API (repeatable; '*' = any)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together in one step."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond the batch; more get 429."),
    max_tokens: Optional[int] = typer.Option(None, "-n", "--max-tokens", show_default=False,
                                             help="Cap on tokens one request generates (default: the context)."),
    name: Optional[str] = typer.Option(None, "--model-name", show_default=False,
                                       help="Model id in /v1/models (default: the file or directory name)."),
    threads: Optional[int] = ThreadsOpt, ctx_size: Optional[int] = CtxOpt, dtype: str = DtypeOpt,
    device: str = DeviceOpt, quant: str = QuantOpt, kv_cache: str = KvCacheOpt, compile: bool = CompileOpt,
) -> None:
    """Serve the model over HTTP: OpenAI (/v1) and Ollama (/api) APIs, a chat page at /, /health, /metrics."""
    from .serve.app import serve_model

    serve_model(model_arg or model, host=host, port=port, api_key=api_key, cors_origins=cors_origin,
                max_batch=max_batch, max_queue=max_queue, max_tokens=max_tokens, name=name, dtype=dtype,
                device=device, context=ctx_size, threads=threads, quant=quant, kv_cache=kv_cache, compile=compile)


def main() -> None:
    from . import native
    from .errors import ZenError

    native.on_build(_build_notice)  # every command: a first run compiles our C kernels (seconds)
    try:
        app()
    except ZenError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        raise SystemExit(130)


if __name__ == "__main__":
    main()
