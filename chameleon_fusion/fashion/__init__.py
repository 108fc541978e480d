"""The bundled default: Fashion-MNIST documents, the recipe that trains on them, its judge, eval and demo."""
