package queueboard

import (
	"maps"
	"strings"
	"testing"
)

func TestBoardSumsTheOthers(t *testing.T) {
	b := New()
	a, aChanged := b.Join()
	c, cChanged := b.Join()
	if err := b.Report(a, map[string]int64{"h:8000": 3000, "h:8001": 0}, 2); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cChanged:
	default:
		t.Fatal("c was not told of a's report")
	}
	select {
	case <-aChanged:
		t.Fatal("a was told of its own report")
	default:
	}
	if got, w := b.Others(c); !maps.Equal(got, map[string]int64{"h:8000": 3000}) || w != 2 {
		t.Fatalf("c sees %v and %d waiting; want a's 3000 on h:8000 (zero counts left out) and 2", got, w)
	}
	if got, w := b.Others(a); len(got) != 0 || w != 0 {
		t.Fatalf("a sees %v and %d waiting; want nothing (only a reported)", got, w)
	}
	if err := b.Report(c, map[string]int64{"h:8000": 500}, 0); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Others(a); got["h:8000"] != 500 {
		t.Fatalf("a sees %d; want c's 500", got["h:8000"])
	}
	// The same report again tells nobody.
	<-aChanged
	if err := b.Report(c, map[string]int64{"h:8000": 500}, 0); err != nil {
		t.Fatal(err)
	}
	select {
	case <-aChanged:
		t.Fatal("an unchanged report woke a")
	default:
	}
	// A change of the requests waiting alone tells the others.
	if err := b.Report(c, map[string]int64{"h:8000": 500}, 3); err != nil {
		t.Fatal(err)
	}
	<-aChanged
	if _, w := b.Others(a); w != 3 {
		t.Fatalf("a sees %d waiting at c; want 3", w)
	}
	b.Leave(c)
	<-aChanged
	if got, w := b.Others(a); len(got) != 0 || w != 0 || b.Routers() != 1 {
		t.Fatalf("after c left a sees %v, %d waiting, %d routers; want nothing, 0, 1", got, w, b.Routers())
	}
}

func TestBoardRejectsBadReports(t *testing.T) {
	b := New()
	id, _ := b.Join()
	if err := b.Report(id, map[string]int64{"h:8000": 100}, 0); err != nil {
		t.Fatal(err)
	}
	many := map[string]int64{}
	for i := range MaxEndpoints + 1 {
		many[strings.Repeat("x", i%50+1)+string(rune('a'+i%26))+strings.Repeat("y", i/26)] = 1
	}
	for name, r := range map[string]map[string]int64{
		"negative":  {"h:8000": -1},
		"no name":   {"": 5},
		"long name": {strings.Repeat("h", MaxNameBytes+1): 5},
		"too many":  many,
	} {
		if len(r) == 0 {
			t.Fatalf("%s: empty case", name)
		}
		if err := b.Report(id, r, 0); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := b.Report(id, nil, -1); err == nil {
		t.Error("negative waiting: accepted")
	}
	other, _ := b.Join()
	if got, _ := b.Others(other); got["h:8000"] != 100 {
		t.Fatalf("after bad reports the good one reads %d; want 100 (a bad report changes nothing)", got["h:8000"])
	}
}
