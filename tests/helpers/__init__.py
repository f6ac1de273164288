"""Code the tests share: tiny models (families), rank launching (ranks), independent references, fake reports."""
