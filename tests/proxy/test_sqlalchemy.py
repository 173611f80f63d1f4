"""SQLAlchemy 2 (psycopg 3 driver) through a transaction pool: a Core and an ORM round trip."""
from __future__ import annotations

import pytest
from sqlalchemy import (Column, ForeignKey, Integer, MetaData, String, Table, create_engine, delete, func, insert,
                        select, update)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload


@pytest.fixture(scope="module")
def engine(module_db, module_proxy_factory):
    proxy = module_proxy_factory(module_db, pool_size=2)
    engine = create_engine(f"postgresql+psycopg://postgres@{proxy.host}:{proxy.port}/{module_db}", pool_size=5)
    yield engine
    engine.dispose()


def test_sqlalchemy_core_round_trip(engine):
    metadata = MetaData()
    products = Table("products", metadata,
                     Column("id", Integer, primary_key=True),
                     Column("name", String(50), nullable=False),
                     Column("stock", Integer, nullable=False))
    metadata.create_all(engine)

    with engine.begin() as conn:
        conn.execute(insert(products), [{"name": f"p{i}", "stock": i} for i in range(200)])
    with engine.begin() as conn:
        conn.execute(update(products).where(products.c.stock < 10).values(stock=products.c.stock + 100))
        conn.execute(delete(products).where(products.c.name == "p199"))
    with engine.connect() as conn:
        count, total = conn.execute(select(func.count(), func.sum(products.c.stock))).one()
        low = conn.execute(select(products.c.name).where(products.c.stock < 15).order_by(products.c.id)).scalars().all()

    assert count == 199
    assert total == sum(range(199)) + 100 * 10
    assert low == ["p10", "p11", "p12", "p13", "p14"]


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list["Book"]] = relationship(back_populates="author", cascade="all, delete-orphan")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


def test_sqlalchemy_orm_round_trip(engine):
    Base.metadata.create_all(engine)

    with Session(engine) as session:
        for a in range(10):
            session.add(Author(name=f"author {a}", books=[Book(title=f"book {a}.{b}") for b in range(a + 1)]))
        session.commit()
    with Session(engine) as session:
        author = session.scalars(select(Author).where(Author.name == "author 3")).one()
        author.books[0].title = "renamed"
        session.delete(session.scalars(select(Author).where(Author.name == "author 9")).one())
        session.commit()
    with Session(engine) as session:
        authors = session.scalars(select(Author).options(selectinload(Author.books)).order_by(Author.id)).all()
        shelf = {a.name: sorted(b.title for b in a.books) for a in authors}
        books = session.scalar(select(func.count()).select_from(Book))

    assert len(shelf) == 9 and "author 9" not in shelf
    assert shelf["author 3"] == ["book 3.1", "book 3.2", "book 3.3", "renamed"]
    assert books == sum(range(1, 10))
