"""Plain generation through the Python API.

python examples/generate_text.py [--model DIR] [--prompt TEXT] [--drafter DIR|none]
"""

import argparse

import mlx_redrafter  # first: routes MLX's BLAS to OpenBLAS on Linux
from mlx_redrafter import generate, load, load_drafter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default=None, help="model dir / .gguf (default model if omitted)"
    )
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--drafter", default="default", help="head dir, 'default' or 'none'")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    drafter = None
    if args.drafter == "default" and args.model is None and mlx_redrafter.DEFAULT_HEAD.is_dir():
        drafter = load_drafter(mlx_redrafter.DEFAULT_HEAD, model=model)
    elif args.drafter not in ("default", "none"):
        drafter = load_drafter(args.drafter, model=model)

    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = generate(model, tokenizer, prompt, max_tokens=args.max_tokens, drafter=drafter)
    print(text)


if __name__ == "__main__":
    main()
