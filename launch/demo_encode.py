"""Demo: encode text, images, a video and fused inputs with a tiny random UNITE model.

    python launch/demo_encode.py --workdir=demo_out

Writes a random `tiny` model to WORKDIR/model (Hugging Face format), encodes a
few generated examples with `Embedder`, and prints the query x candidate
similarity matrix. The weights are random, so the scores only show that every
modality flows through the same model into one vector space.

The program is `unite_jax.demo.tour`.
"""

from unite_jax.demo.tour import main

if __name__ == "__main__":
    main()
