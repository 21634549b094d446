"""Publish an exported model folder to the Hugging Face Hub in one commit.

    python hub/push.py RUN_DIR/model --repo-id ORG/NAME [--private] [--revision BRANCH] [--commit-message MSG]

The token comes from HF_TOKEN or `hf auth login` and is never printed.
"""
import argparse
import logging
import sys

from timm_gcp.hub.push import push_model, redact_token


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', help='exported model folder (model.safetensors, config.json, README.md)')
    parser.add_argument('--repo-id', required=True, help='target repository, ORG/NAME')
    parser.add_argument('--private', action='store_true', help='create the repository private')
    parser.add_argument('--revision', default=None, help='branch to commit to (created if missing; default main)')
    parser.add_argument('--commit-message', default=None)
    parser.add_argument('--max-retries', type=int, default=5, help='retries on 429/5xx/connection errors')
    parser.add_argument('--retry-delay', type=float, default=1.0, help='first backoff delay in seconds (doubles)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    try:
        result = push_model(args.folder, args.repo_id, private=args.private, revision=args.revision,
                            commit_message=args.commit_message, max_retries=args.max_retries,
                            retry_delay=args.retry_delay)
    except Exception as e:
        print(redact_token(f'push failed: {type(e).__name__}: {e}'), file=sys.stderr)
        return 1
    print(f'pushed {result.repo_id}@{result.revision}: commit {result.commit_oid}')
    print(result.commit_url)
    for name, sha in sorted(result.sha256.items()):
        print(f'  sha256 {sha}  {name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
